"""The two protocols on hand-made scores where the right answer is known."""

import json

import numpy as np
import pytest
import torch

from cada.data.mvtec import Sample
from cada.evaluate import METRICS, THRESHOLDS, EvalOutputs, format_per_class, format_table, results_table
from cada.metrics import binary_metrics, pixel_metrics
from cada.scoring import align


def _outputs(offsets, per_class=40, size=8, seed=0):
    """Each class separates normal from anomalous perfectly, but its scores sit at its own offset."""
    rng = np.random.default_rng(seed)
    samples, maps, masks = [], [], []
    for class_index, offset in enumerate(offsets):
        for i in range(per_class):
            label = i % 2
            samples.append(Sample(f"{class_index}/{i}.png", label, f"class{class_index}"))
            image_map = offset + rng.uniform(0, 0.1, (size, size))
            mask = np.zeros((size, size), bool)
            if label:
                mask[:2, :2] = True
                image_map[mask] += 0.5
            maps.append(image_map)
            masks.append(mask)
    maps = torch.tensor(np.stack(maps), dtype=torch.float32)
    scores = maps.flatten(1).amax(dim=1).numpy()
    n = len(samples)
    u = np.repeat(np.asarray(offsets, np.float32), per_class)
    return EvalOutputs(
        samples, maps, torch.tensor(np.stack(masks)), np.ones(n, bool), scores, u, np.ones(n, np.float32)
    )


def test_absolute_unified_suffers_from_class_offsets_and_alignment_fixes_it():
    outputs = _outputs([0.0, 0.3, 0.6])
    results = results_table(outputs, "revdist", ("none", "cada"))
    rows = {(r["align"], r["protocol"]): r for r in results["rows"]}
    # Per class everything separates: model-unified is perfect with or without alignment.
    assert rows[("none", "model-unified")]["i_auroc"] == pytest.approx(1.0)
    assert rows[("none", "model-unified")]["p_auroc"] == pytest.approx(1.0)
    # Pooled, a high-offset class's normals outscore a low-offset class's defects.
    assert rows[("none", "absolute-unified")]["i_auroc"] < 0.9
    # Subtracting each image's true class offset (u) puts all classes on one scale again.
    assert rows[("cada", "absolute-unified")]["i_auroc"] == pytest.approx(1.0)
    assert rows[("cada", "absolute-unified")]["p_auroc"] == pytest.approx(1.0)
    # The same story for F1-max and AUPRO.
    for key in ("i_f1max", "p_f1max", "aupro"):
        assert rows[("none", "model-unified")][key] == pytest.approx(1.0)
        assert rows[("cada", "absolute-unified")][key] == pytest.approx(1.0)
    assert rows[("none", "absolute-unified")]["aupro"] < 0.9
    assert rows[("none", "absolute-unified")]["p_f1max"] < 0.9
    # One F1-max threshold when the classes are pooled; none when each class has its own.
    for (_, protocol), row in rows.items():
        assert set(row) == {"method", "align", "protocol", *METRICS, *THRESHOLDS}
        for key in THRESHOLDS:
            assert (row[key] is None) == (protocol == "model-unified")
    # aligned maps: normal pixels in [0, 0.1), defects in [0.5, 0.6): the best threshold is the lowest defect
    assert 0.5 <= rows[("cada", "absolute-unified")]["p_f1max_threshold"] < 0.6
    assert set(results["per_class"]["none"]) == {"class0", "class1", "class2"}
    json.dumps(results, allow_nan=False)  # the JSON other tools read has no NaN
    table = format_table(results)
    assert "absolute-unified" in table
    assert table.splitlines()[0].split()[3:] == ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
    assert "aupro=100.0" in format_per_class(results)


def test_model_unified_is_the_mean_of_per_class_figures():
    outputs = _outputs([0.0, 0.2])
    outputs.base_scores[:3] = [0.9, 0.0, 0.9]  # spoil class0 a little
    outputs.maps[3, 5, 5] = outputs.maps[5, 6, 6] = 0.9  # and two of its normal pixels
    results = results_table(outputs, "revdist", ("none",))
    per_class = results["per_class"]["none"]
    model_unified = [r for r in results["rows"] if r["protocol"] == "model-unified"][0]
    for key in METRICS:
        expected = np.mean([per_class["class0"][key], per_class["class1"][key]])
        assert model_unified[key] == pytest.approx(expected)
    for key in ("i_auroc", "i_f1max", "p_auroc", "p_f1max", "aupro"):
        assert per_class["class0"][key] < 1.0


def test_class_without_anomalous_images_gives_none_not_a_crash():
    outputs = _outputs([0.0, 0.3])
    keep = [i for i, s in enumerate(outputs.samples) if not (s.class_name == "class1" and s.label == 1)]
    outputs = EvalOutputs(
        [outputs.samples[i] for i in keep],
        outputs.maps[keep],
        outputs.masks[keep],
        outputs.has_mask[keep],
        outputs.base_scores[keep],
        outputs.u[keep],
        outputs.spread[keep],
    )
    results = results_table(outputs, "revdist", ("none",))
    assert results["per_class"]["none"]["class1"]["i_auroc"] is None
    model_unified = [r for r in results["rows"] if r["protocol"] == "model-unified"][0]
    assert model_unified["i_auroc"] == pytest.approx(results["per_class"]["none"]["class0"]["i_auroc"])
    for key in ("p_auroc", "p_f1max", "aupro", "p_f1max_threshold"):
        assert results["per_class"]["none"]["class1"][key] is None
    assert model_unified["aupro"] == pytest.approx(results["per_class"]["none"]["class0"]["aupro"])
    assert "aupro=-" in format_per_class(results)


def test_figures_equal_the_metrics_on_the_materialised_aligned_maps():
    """evaluate reads the aligned maps of a subset lazily; the figures must be those of the full arrays."""
    outputs = _outputs([0.0, 0.3, 0.6], per_class=12)
    rng = np.random.default_rng(1)
    outputs.maps += torch.from_numpy(rng.normal(0, 0.2, outputs.maps.shape).astype(np.float32))
    outputs.spread[:] = rng.uniform(0.5, 2.0, outputs.spread.shape)
    outputs.has_mask[3] = False  # an anomalous image without mask: out of the pixel metrics only
    results = results_table(outputs, "revdist", ("none", "cada"))
    class_names = outputs.class_names
    for align_name, subset, got in [
        ("none", np.arange(36), results["rows"][0]),
        ("cada", np.arange(36), results["rows"][2]),
        ("cada", np.flatnonzero(class_names == "class0"), results["per_class"]["cada"]["class0"]),
        ("none", np.flatnonzero(class_names == "class2"), results["per_class"]["none"]["class2"]),
    ]:
        u, spread = torch.from_numpy(outputs.u[subset]), torch.from_numpy(outputs.spread[subset])
        image_scores, maps = torch.from_numpy(outputs.base_scores[subset]), outputs.maps[subset]
        if align_name == "cada":
            image_scores, maps = align(image_scores, u, spread), align(maps, u, spread)
        image = binary_metrics(image_scores, outputs.labels[subset])
        keep = outputs.has_mask[subset]
        pixel = pixel_metrics(maps[keep], outputs.masks[subset][keep])
        assert got["i_auroc"] == image["auroc"] and got["i_ap"] == image["ap"]
        assert (got["i_f1max"], got["i_f1max_threshold"]) == (image["f1max"], image["f1max_threshold"])
        assert (got["p_auroc"], got["p_ap"], got["aupro"]) == (pixel["auroc"], pixel["ap"], pixel["aupro"])
        assert (got["p_f1max"], got["p_f1max_threshold"]) == (pixel["f1max"], pixel["f1max_threshold"])
    assert 0.5 < results["rows"][0]["aupro"] < 1.0


@pytest.fixture(scope="module")
def tiny_detector(tiny_data, tiny_settings):
    from cada import Detector

    return Detector(tiny_settings()).fit(tiny_data, progress=False)


def test_original_resolution_equals_model_resolution_when_the_sizes_agree(tiny_data, tiny_detector):
    """The synthetic images and masks are 64 x 64, the model's size: upsampling is the identity."""
    from cada.data.mvtec import mvtec_samples
    from cada.evaluate import collect

    samples = mvtec_samples(tiny_data, "test")
    model = collect(tiny_detector, samples, progress=False)
    original = collect(tiny_detector, samples, progress=False, pixel_resolution="original")
    assert (original.original_sizes == 64).all()
    assert np.array_equal(original.anomalous_pixels, model.anomalous_pixels)
    aligners = ("none", "cada")
    assert results_table(original, "revdist", aligners) == results_table(model, "revdist", aligners)
    with pytest.raises(ValueError, match="pixel_resolution"):
        collect(tiny_detector, samples, progress=False, pixel_resolution="full")


def test_original_resolution_upsamples_maps_to_each_masks_size(tiny_data, tiny_detector, tmp_path):
    """Test images and masks enlarged to 96 x 80 (one class) and 72 x 72 (the others): the pixel metrics must
    be those of the 64 x 64 aligned maps upsampled bilinearly to those sizes, against the full-size masks."""
    import shutil

    import sklearn.metrics as skm
    import torch.nn.functional as F
    from PIL import Image

    from cada.data.mvtec import mvtec_samples
    from cada.evaluate import collect

    root = tmp_path / "big"
    shutil.copytree(tiny_data, root)
    for path in root.glob("*/test/*/*.png"):
        size = (96, 80) if path.parts[-4] == "weave" else (72, 72)
        Image.open(path).resize(size, Image.Resampling.BILINEAR).save(path)
    for path in root.glob("*/ground_truth/*/*.png"):
        size = (96, 80) if path.parts[-4] == "weave" else (72, 72)
        Image.open(path).resize(size, Image.Resampling.NEAREST).save(path)
    samples = mvtec_samples(root, "test")
    outputs = collect(tiny_detector, samples, progress=False, pixel_resolution="original", cache_dir=None)
    weave = outputs.class_names == "weave"
    assert (outputs.original_sizes[weave] == (80, 96)).all() and (outputs.original_sizes[~weave] == 72).all()
    results = results_table(outputs, "revdist", ("none", "cada"))
    maps = align(outputs.maps, torch.from_numpy(outputs.u), torch.from_numpy(outputs.spread))
    big_maps, big_masks = [], []
    for image_map, sample, (height, width) in zip(maps, outputs.samples, outputs.original_sizes):
        big = F.interpolate(image_map[None, None], size=(int(height), int(width)), mode="bilinear", align_corners=False)
        big_maps.append(big.ravel().numpy())
        mask = (
            np.zeros((height, width), bool) if sample.mask_path is None else np.array(Image.open(sample.mask_path)) > 0
        )
        big_masks.append(mask.ravel())
    pooled = results["rows"][2]  # cada, absolute-unified
    assert pooled["align"] == "cada" and pooled["protocol"] == "absolute-unified"
    big_maps, big_masks = np.concatenate(big_maps), np.concatenate(big_masks)
    assert pooled["p_auroc"] == pytest.approx(skm.roc_auc_score(big_masks, big_maps), abs=1e-6)
    assert pooled["p_ap"] == pytest.approx(skm.average_precision_score(big_masks, big_maps), abs=1e-6)


def test_normals_aligned_reference_is_the_pooled_auroc_when_normals_share_one_distribution():
    """Two products whose normal scores are the same values: pooled I-AUROC equals the anomaly-weighted mean of
    the per-product I-AUROC, and differs from the plain mean when the products' anomaly counts differ."""
    from cada.evaluate import per_product_decisions

    normal = np.linspace(0.0, 1.0, 11)
    easy = np.array([2.0, 3.0])  # above every normal: I-AUROC 1
    hard = np.array([0.05, 0.35, 0.55, 0.75, 0.95, 1.5])  # partly among the normals
    scores = np.concatenate([normal, easy, normal, hard])
    labels = np.array([0] * 11 + [1] * 2 + [0] * 11 + [1] * 6)
    names = np.array(["easy"] * 13 + ["hard"] * 17)
    block = per_product_decisions(scores, labels, names, threshold=0.5)
    per = {name: binary_metrics(scores[names == name], labels[names == name])["auroc"] for name in ("easy", "hard")}
    assert block["products"]["easy"]["i_auroc"] == per["easy"] == 1.0
    assert block["products"]["hard"]["i_auroc"] == pytest.approx(per["hard"])
    assert block["normals_aligned_i_auroc"] == pytest.approx(binary_metrics(scores, labels)["auroc"])
    assert block["normals_aligned_i_auroc"] == pytest.approx((2 * per["easy"] + 6 * per["hard"]) / 8)
    assert block["normals_aligned_i_auroc"] < (per["easy"] + per["hard"]) / 2
    # Lifting "hard" above "easy"'s normals ranks its top anomaly above all of them: the ceiling is higher, not 1.
    assert block["normals_aligned_i_auroc"] < block["ceiling_i_auroc"] < 1


def test_per_defect_rows_rank_each_defect_type_against_its_products_normals():
    """A product with an easy and a hard defect type: each type's I-AUROC is its own images against the product's
    normals (another product's normals do not count), its recall is at the pooled threshold."""
    import sklearn.metrics as skm

    from cada.evaluate import per_product_decisions

    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.15, 0.35, 0.6, 5.0, 0.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1])
    names = np.array(["a"] * 9 + ["b"] * 2)
    defects = np.array(["good"] * 4 + ["crack"] * 2 + ["stain"] * 3 + ["good", "dent"])
    block = per_product_decisions(scores, labels, names, threshold=0.5, defects=defects)
    found = block["products"]["a"]["defects"]
    assert list(found) == ["crack", "stain"]
    assert found["crack"] == {"n": 2, "i_auroc": 1.0, "recall": 1.0}
    stain = np.r_[scores[:4], scores[6:9]], np.r_[np.zeros(4), np.ones(3)]
    assert found["stain"]["i_auroc"] == pytest.approx(skm.roc_auc_score(stain[1], stain[0]))
    assert found["stain"]["recall"] == pytest.approx(1 / 3)
    assert block["products"]["b"]["defects"] == {"dent": {"n": 1, "i_auroc": 0.0, "recall": 0.0}}
    assert "defects" not in per_product_decisions(scores, labels, names, threshold=0.5)["products"]["a"]


def test_calibration_check_warns_when_the_test_normals_contradict_the_target_fpr():
    """Flagging 2 of 200 normals is what a 1% target gives by chance; 20 of 200, all from one product, is not:
    the check names that product (20 of 100) and not the other (0 of 100)."""
    from scipy.stats import binom

    from cada.evaluate import calibration_check, format_calibration_check

    labels = np.array([0] * 200 + [1] * 10)
    names = np.array(["plate"] * 100 + ["tile"] * 100 + ["tile"] * 10)
    scores = np.zeros(210)
    scores[200:] = 5.0
    scores[[0, 150]] = 2.0  # one normal of each product above the threshold
    fine = calibration_check(scores, labels, names, threshold=1.0, target_fpr=0.01)
    assert fine["holds"] and fine["pooled"]["flagged"] == 2 and fine["pooled"]["normals"] == 200
    assert fine["pooled"]["p_value"] == pytest.approx(1 - binom.cdf(1, 200, 0.01))
    assert format_calibration_check({"calibration_check": {"knn": fine}}) == []
    scores[100:119] = 2.0  # 19 more of the tile normals
    missed = calibration_check(scores, labels, names, threshold=1.0, target_fpr=0.01)
    assert not missed["holds"] and missed["pooled"]["flagged"] == 21 and missed["products"]["tile"]["flagged"] == 20
    assert missed["products"]["plate"]["p_value"] > 0.01 > missed["products"]["tile"]["p_value"]
    assert missed["products"]["tile"]["missed"] and not missed["products"]["plate"]["missed"]
    (line,) = format_calibration_check({"calibration_check": {"knn": missed, "none": fine}})
    assert line.startswith("warning (knn): the threshold calibrated at 1.0% FPR flags more test normals than chance")
    assert "all products 10.5% (21 of 200), tile 20.0% (20 of 100)." in line and "plate" not in line
    assert "cada calibrate RUN --normal DIR" in line


def test_results_table_checks_thresholds_only_when_they_were_calibrated_at_a_target_fpr():
    outputs = _outputs([0.0, 1.0])
    thresholds = {"none": 0.55}  # class1's normals (offset 1.0) are all above it
    checked = results_table(outputs, "revdist", ("none",), thresholds, target_fpr=0.01)
    check = checked["calibration_check"]["none"]
    assert not check["holds"] and check["products"]["class1"]["flagged"] == 20 and check["threshold"] == 0.55
    assert check["products"]["class0"]["flagged"] == 0
    assert "calibration_check" not in results_table(outputs, "revdist", ("none",), thresholds)
    json.dumps(checked)  # the JSON report takes it as it is


def test_evaluate_says_when_the_calibrated_threshold_fails_on_the_test_normals(
    tiny_data, tiny_detector, tmp_path, caplog
):
    """A threshold below every test image (as calibration images far easier than the test normals would give):
    the text report (logged) and the HTML report say so, the JSON holds the counts."""
    import copy
    import html
    import logging

    from cada.workflows import evaluate

    detector = copy.deepcopy(tiny_detector)
    detector.calibration = {
        "threshold": -1e9,
        "base_threshold": -1e9,
        "how": "fpr",
        "target_fpr": 0.01,
        "n_normal": 100,
        "n_anomalous": 0,
        "source": "test",
        "normal_scores": [],
    }
    caplog.set_level(logging.INFO, logger="cada")
    results = evaluate(detector, tiny_data, progress=False, report_dir=tmp_path, cache_dir=None)
    out, align_name = caplog.text, detector.settings.align
    flags = "the threshold calibrated at 1.0% FPR flags more test normals than chance allows (p < 0.01): all "
    assert f"warning ({align_name}): {flags}" in out and f"warning (none): {flags}" in out
    check = results["calibration_check"][align_name]
    assert not check["holds"] and check["pooled"]["flagged"] == check["pooled"]["normals"] > 0
    assert html.escape(flags) in (tmp_path / "report.html").read_text()
    detector.calibration.update(threshold=1e9, base_threshold=1e9)
    caplog.clear()
    evaluate(detector, tiny_data, progress=False, cache_dir=None)
    assert "warning (" not in caplog.text
