"""Detector: fit, predict, and a run folder that round-trips bit-exactly and refuses what it cannot read."""

import json

import pytest
import torch

from cada import Detector
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
    trained.threshold = float(prediction.scores.median())
    assert trained.predict(images[:5]).decisions.sum() == (prediction.scores > trained.threshold).sum()
    trained.threshold = None


def test_training_info_records_what_happened(trained):
    info = trained.training_info
    assert info["n_images"] == 24 and len(info["classes"]) == 4
    assert trained.aligner.min_spread.item() > 0


def test_save_load_round_trips_bit_exactly(trained, tiny_data, tmp_path):
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    trained.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
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
    config["settings"]["aligner"]["hidden"] = 17  # weights no longer fit the described model
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleRunError, match="do not fit"):
        Detector.load(folder)


def test_same_seed_same_model(tiny_data, tiny_settings, trained):
    again = Detector(tiny_settings()).fit(tiny_data, progress=False)
    for name, tensor in trained._modules().state_dict().items():
        assert torch.equal(tensor, again._modules().state_dict()[name]), name
