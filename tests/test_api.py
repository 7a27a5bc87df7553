"""Detector: fit, predict, and a run folder that round-trips bit-exactly and refuses what it cannot read."""

import json
import warnings

import pytest
import torch

from cada import Detector
from cada.api import split_holdout
from cada.checkpoint import IncompatibleRunError
from cada.data.dataset import load_all
from cada.data.mvtec import mvtec_samples


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_settings):
    return Detector(tiny_settings()).fit(tiny_data, progress=False)


def test_predict_gives_scores_and_maps_without_class_names(trained, tiny_data):
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    prediction = trained.predict(images[:5])
    assert prediction.scores.shape == (5,) and prediction.maps.shape == (5, 64, 64)
    assert torch.isfinite(prediction.maps).all()
    assert prediction.decisions is None  # no threshold yet


def test_training_info_records_what_happened(trained):
    info = trained.training_info
    assert info["n_images"] == 24 and len(info["classes"]) == 4
    assert trained.aligner.min_spread.item() > 0


def test_save_load_round_trips_bit_exactly(trained, tiny_data, tmp_path):
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    trained.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors", "train_log.csv"]
    loaded = Detector.load(tmp_path / "run")
    for name, tensor in trained._modules().state_dict().items():
        assert torch.equal(tensor, loaded._modules().state_dict()[name]), name
    before, after = trained.predict(images), loaded.predict(images)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)
    assert loaded.settings == trained.settings


def test_run_from_another_format_version_is_refused_clearly(trained, tmp_path):
    folder = trained.save(tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleRunError, match="format 99"):
        Detector.load(folder)


def test_missing_or_mismatched_files_are_refused_clearly(trained, tmp_path):
    with pytest.raises(IncompatibleRunError, match="config.json is missing"):
        Detector.load(tmp_path)
    folder = trained.save(tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    config["settings"]["backbone"] = "efficientnet_lite1"  # weights no longer fit the described model
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleRunError, match="do not fit"):
        Detector.load(folder)


def test_same_seed_same_model(tiny_data, tiny_settings, trained):
    again = Detector(tiny_settings()).fit(tiny_data, progress=False)
    for name, tensor in trained._modules().state_dict().items():
        assert torch.equal(tensor, again._modules().state_dict()[name]), name


@pytest.mark.parametrize(
    "align", ["cada-sigma", "cada-score", "class-aware", "classifier", "knn", "knn-distance", "knn-level"]
)
def test_every_aligner_trains_saves_and_loads(tiny_data, tiny_settings, tmp_path, align):
    detector = Detector(tiny_settings(align=align)).fit(tiny_data, progress=False)
    images, samples = load_all(mvtec_samples(tiny_data, "test"), 64)
    names = [s.class_name for s in samples]
    loaded = Detector.load(detector.save(tmp_path / align))
    before, after = detector.infer(images, names), loaded.infer(images, names)
    assert torch.equal(before.u, after.u) and torch.equal(before.spread, after.spread)
    assert (after.spread > 0).all()
    if align == "class-aware":  # the upper-bound reference cannot run on anonymous images
        with pytest.raises(ValueError, match="needs the class name"):
            loaded.predict(images)
    else:
        assert loaded.predict(images).scores.shape == (len(images),)


def test_calibration_at_a_false_positive_rate_is_stored_and_used(trained, tiny_data, tmp_path):
    normal, _ = load_all(mvtec_samples(tiny_data, "train"), 64)
    calibration = trained.calibrate(normal, fpr=0.25, source="test")
    scores = trained.predict(normal).scores
    assert (scores >= calibration["threshold"]).float().mean() <= 0.25
    assert (scores >= calibration["threshold"]).sum() == 5  # floor(0.25 * 25) - 1 flagged: no ties here
    loaded = Detector.load(trained.save(tmp_path / "run"))
    assert loaded.calibration == calibration
    assert torch.equal(loaded.predict(normal).decisions, scores >= calibration["threshold"])
    trained.calibration = None


def test_f1_calibration_on_labelled_validation_images(trained, tiny_data):
    images, samples = load_all(mvtec_samples(tiny_data, "test"), 64)
    labels = [s.label for s in samples]
    calibration = trained.calibrate_f1(images, labels)
    assert calibration["how"] == "f1" and calibration["n_anomalous"] == sum(labels)
    trained.calibration = None


def test_epochs_are_passes_over_the_images_actually_trained_on(tiny_data, tiny_settings, monkeypatch):
    from cada.engine import Trainer

    steps, announced = [], []
    train_loop = Trainer.loop

    def counting_loop(self, *args, **kwargs):  # the steps the base really takes
        losses = train_loop(self, *args, **kwargs)
        steps.append(len(losses))
        return losses

    monkeypatch.setattr(Trainer, "loop", counting_loop)
    settings = tiny_settings()
    settings.base.iters, settings.base.epochs, settings.base.min_iters = None, 1.5, 0  # no floor of 400 steps
    detector = Detector(settings).fit(
        tiny_data, progress=False, holdout=0.34, fpr=0.5, on_start=lambda n, iters: announced.append((n, iters))
    )
    # 16 images kept out of 24 (the held-out ones are not trained on): ceil(1.5 x 16 / 4) = 6 steps
    assert announced == [(16, 6)] and steps == [6]
    info = detector.training_info
    assert (info["base_iters"], info["base_epochs"]) == (6, 1.5)
    assert (detector.settings.base.iters, detector.settings.base.epochs) == (None, 1.5)  # the request is kept as given


def test_holdout_trains_on_the_rest_and_calibrates_on_the_held_out(tiny_data, tiny_settings):
    detector = Detector(tiny_settings()).fit(tiny_data, progress=False, holdout=0.34, fpr=0.5)
    assert detector.training_info["n_images"] == 16  # 2 of 6 per class held out
    assert detector.calibration["n_normal"] == 8 and detector.calibration["target_fpr"] == 0.5


def test_calibration_warns_about_training_images_and_too_few_images(tiny_data, tiny_settings):
    """Training images score lower than new ones (knn-distance most: they are at distance 0 from themselves), and
    8 images cannot hold a 1% false-positive rate on new ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # held-out images at 50%: no warning
        detector = Detector(tiny_settings()).fit(tiny_data, progress=False, holdout=0.34, fpr=0.5)
    kept, held_out = split_holdout(mvtec_samples(tiny_data, "train"), 0.34, detector.settings.seed)
    with pytest.warns(UserWarning, match="16 of 20 calibration images are training images of this run"):
        detector.calibrate(load_all(kept + held_out[:4], 64)[0], fpr=0.5)
    with pytest.warns(UserWarning, match="8 normal images cannot resolve a false-positive rate of 0.01"):
        detector.calibrate(load_all(held_out, 64)[0], fpr=0.01)
