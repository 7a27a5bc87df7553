"""RevDist + PatchCore on one encoder: its RevDist is RevDist, each map is normalised by look-alike training images,
the weight mixes the normalised maps, and the run exports as any other."""

import numpy as np
import pytest
import torch

from cada import Detector
from cada.config import BaseTraining
from cada.data.dataset import load_all, normalize
from cada.data.mvtec import mvtec_samples
from cada.export import export_onnx
from cada.methods.revdist import RevDist
from cada.methods.revdist_patchcore import SMOOTHING_SIGMA, TOP_FRACTION, RevDistPatchCore
from cada.metrics import auroc
from cada.runtime import exported_scorer
from cada.scoring import align, image_score, smooth
from cada.workflows.demo import raw_map_rows

from helpers import tiny_preset

TRAINING = BaseTraining(iters=3, epochs=None, batch_size=4)


def fitted(cls, images):
    torch.manual_seed(0)
    model = cls("efficientnet_lite0", 64, pretrained=False)
    model.fit(images, TRAINING, torch.Generator().manual_seed(0), progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def model(images):
    return fitted(RevDistPatchCore, images)


def scores(maps: torch.Tensor) -> torch.Tensor:
    return image_score(smooth(maps.float(), SMOOTHING_SIGMA), TOP_FRACTION)


def normalised(model, x: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each component map aligned by its normaliser, as the method's forward does."""
    revdist, patchcore, embedding = model.component_maps(x, index)
    maps = []
    for normaliser, raw in zip(model._normalisers(), (revdist, patchcore)):
        u, gamma = normaliser.normal_stats(embedding, leave_out=index)
        maps.append(align(raw, u, normaliser.spread(u, gamma)))
    return maps


def test_its_revdist_half_trains_and_scores_exactly_as_revdist(images, model):
    revdist = fitted(RevDist, images)
    fused_state = model.state_dict()
    for key, value in revdist.state_dict().items():
        assert torch.equal(fused_state[key], value), key
    with torch.inference_mode():
        x = normalize(images[:4])
        assert torch.equal(model.component_maps(x)[0], revdist(x).anomaly_map)


def test_both_maps_are_normalised_so_that_a_typical_training_image_scores_one(images, model):
    """Raw, the maps lie on unrelated scales (here PatchCore's ~5 times RevDist's); normalised by each image's
    look-alike training images (itself left out), both put the typical training image at 1 (one normal std = 1/3)."""
    x, index = normalize(images), torch.arange(len(images))
    with torch.inference_mode():
        revdist, patchcore, _ = model.component_maps(x, index)
        assert scores(patchcore).median() > 3 * scores(revdist).median()
        for maps in normalised(model, x, index):
            assert abs(float(scores(maps).median()) - 1) < 1 / 3


def test_the_weight_mixes_the_normalised_maps_and_training_images_are_left_out_of_their_own(images, model):
    x, index = normalize(images[:4]), torch.arange(4)
    with torch.inference_mode():
        revdist, patchcore = normalised(model, x, index)
        for weight, expected in ((0.0, revdist), (1.0, patchcore), (0.25, 0.75 * revdist + 0.25 * patchcore)):
            model.options.patchcore_weight = weight
            assert torch.allclose(model.training_output(x, index).anomaly_map, expected, atol=1e-5)
        model.options.patchcore_weight = 0.5
    normaliser, own = model.normalise_revdist, torch.arange(4)
    _, nearest = normaliser.neighbours_of(normaliser.train_descriptors[:4])
    _, left_out = normaliser.neighbours_of(normaliser.train_descriptors[:4], leave_out=own)
    assert torch.equal(nearest[:, 0], own) and not (left_out == own[:, None]).any()


def test_a_run_saves_loads_and_exports_with_the_same_scores(tiny_data, tmp_path):
    detector = Detector(tiny_preset("revdist-patchcore"), pretrained=False).fit(tiny_data, progress=False)
    detector.save(tmp_path / "run")
    loaded = Detector.load(tmp_path / "run")
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    expected = detector.predict(images)
    assert torch.equal(loaded.predict(images).scores, expected.scores)
    scorer, *_ = exported_scorer(export_onnx(loaded, tmp_path / "model.onnx"))
    scores_onnx, maps, columns = scorer(images)
    assert (maps - expected.maps).abs().max().item() <= 1e-4
    assert (scores_onnx - expected.scores).abs().max().item() <= 1e-4
    # one value per image in every column (u, spread, distance, ...), whatever batch size the graph was traced at
    assert {"u", "spread", "score_offset"} <= set(columns)
    assert all(len(values) == len(images) > 1 for values in columns.values())


def test_the_training_maps_reuse_the_normaliser_pass_and_equal_a_fresh_one(images, model):
    """fit_normalisers keeps each training image's map pieces, so the aligner's pass over the training images does
    not search the bank again; its maps are those that a fresh pass computes, bit for bit."""
    x, index = normalize(images[4:8]), torch.arange(4, 8)  # one of fit's batches (batch size 4)
    assert model._training_pieces is not None and len(model._training_pieces.embedding) == len(images)
    with torch.inference_mode():
        kept = model.training_output(x, index)
        pieces, model._training_pieces = model._training_pieces, None
        try:
            fresh = model.training_output(x, index)
        finally:
            model._training_pieces = pieces
    assert torch.equal(kept.anomaly_map, fresh.anomaly_map)
    assert torch.equal(kept.align_features, fresh.align_features)


def test_the_demo_rates_each_raw_map_pooled_and_per_product(tiny_data):
    """`cada demo`'s lines for the maps before normalisation: each raw map's image score, ranked over all products
    at once and within each product."""
    detector = Detector(tiny_preset("revdist-patchcore"), pretrained=False).fit(tiny_data, progress=False)
    samples = mvtec_samples(tiny_data, "test")
    rows = raw_map_rows(detector, samples)
    images, _ = load_all(samples, 64)
    labels = np.array([s.label for s in samples])
    classes = np.array([s.class_name for s in samples])
    with torch.inference_mode():
        raw = detector.method.component_maps(normalize(images))
    for name, maps in zip(("RevDist's map, raw", "PatchCore's map, raw"), raw):
        values = scores(maps).numpy()
        per_product = [auroc(values[classes == c], labels[classes == c]) for c in sorted(set(classes))]
        assert rows[name]["absolute-unified"] == pytest.approx(auroc(values, labels))
        assert rows[name]["model-unified"] == pytest.approx(np.mean(per_product))
    assert raw_map_rows(Detector(tiny_preset("revdist"), pretrained=False), samples) == {}  # one map: nothing to show
