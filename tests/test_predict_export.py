"""Calibration, prediction on anonymous images, and the ONNX export, as a user runs them."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cada import Detector
from cada.cli import main
from cada.config import Settings
from cada.data.dataset import load_all
from cada.data.mvtec import mvtec_samples
from cada.export import export_onnx, onnx_scorer

DEFAULT_ALIGN = Settings().align  # what `cada train` aligns with unless told


@pytest.fixture(scope="module")
def calibrated_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--image-size", "64", "--iters", "3",
                 "--align-iters", "5", "--quiet"]) == 0
    normal = [str(tiny_data / name / "train" / "good") for name in ("weave", "marble", "washer", "circuit")]
    assert main(["calibrate", str(run), "--normal", *normal, "--fpr", "0.1"]) == 0
    return run


def test_calibrate_stores_how_the_threshold_was_chosen(calibrated_run):
    config = json.loads((calibrated_run / "config.json").read_text())
    calibration = config["calibration"]
    assert calibration["how"] == "fpr" and calibration["target_fpr"] == 0.1 and calibration["n_normal"] == 24
    assert "normal images in" in calibration["source"]


def test_predict_writes_csv_json_overlays_and_masks_and_skips_bad_files(calibrated_run, tiny_data, tmp_path):
    images = tmp_path / "line"
    images.mkdir()
    for i, path in enumerate(sorted((tiny_data / "washer" / "test").rglob("*.png"))[:5]):
        (images / f"img {i}.png").write_bytes(path.read_bytes())  # no class names, no layout
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["predict", str(calibrated_run), str(images), "--out", str(out), "--overlays", "--masks",
                 "--quiet"]) == 0
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    extra = {"nearest_distance", "unfamiliar"} if DEFAULT_ALIGN == "knn" else set()  # knn's unfamiliar signal
    assert len(rows) == 5 and set(rows[0]) == {"path", "score", "anomalous", *extra}
    threshold = json.loads((calibrated_run / "config.json").read_text())["calibration"]["threshold"]
    assert all(int(r["anomalous"]) == (float(r["score"]) >= threshold - 1e-6) for r in rows)
    report = json.loads((out / "predictions.json").read_text())
    assert len(report["predictions"]) == 5 and "broken.png" in report["skipped"][0]
    assert len(list((out / "overlays").glob("*.png"))) == 5 and len(list((out / "masks").glob("*.png"))) == 5
    mask = np.array(Image.open(next((out / "masks").glob("*.png"))))
    assert set(np.unique(mask)) <= {0, 255}


def test_onnx_export_matches_pytorch(calibrated_run, tiny_data, tmp_path):
    detector = Detector.load(calibrated_run)
    onnx_file = export_onnx(detector, tmp_path / "model.onnx")
    scorer, size, threshold, _ = onnx_scorer(onnx_file)
    assert size == 64 and threshold == detector.threshold
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    expected = detector.predict(images)
    scores, maps = scorer(images)
    assert (maps - expected.maps).abs().max().item() <= 1e-4
    assert torch.equal(scores >= threshold, expected.decisions)


def test_predict_runs_an_exported_model_with_the_same_outputs(calibrated_run, tiny_data, tmp_path):
    assert main(["export", str(calibrated_run), "--out", str(tmp_path / "model.onnx")]) == 0
    folder = tiny_data / "marble" / "test"
    assert main(["predict", str(tmp_path / "model.onnx"), str(folder), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["predict", str(calibrated_run), str(folder), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a = json.loads((tmp_path / "a" / "predictions.json").read_text())["predictions"]
    b = json.loads((tmp_path / "b" / "predictions.json").read_text())["predictions"]
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["anomalous"] for r in a] == [r["anomalous"] for r in b]
    assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-4)


def test_evaluate_reports_decisions_at_the_stored_threshold(calibrated_run, tiny_data, tmp_path, capsys):
    assert main(["evaluate", str(calibrated_run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"),
                 "--quiet"]) == 0
    assert "at the stored threshold" in capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    for row in results["rows"]:
        for key in ("fpr", "recall", "precision", "f1", "class_fpr_min", "class_fpr_max", "threshold"):
            assert key in row
        assert row["class_fpr_min"] <= row["class_fpr_max"]
    assert "fpr" in results["per_class"][DEFAULT_ALIGN]["weave"]


def test_evaluate_shows_the_oracle_and_each_product_at_one_threshold(calibrated_run, tiny_data, tmp_path, capsys):
    assert main(["evaluate", str(calibrated_run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    oracle = {row["protocol"]: row for row in results["oracle"]}
    base = {row["protocol"]: row for row in results["rows"] if row["align"] == "none"}
    # A per-product affine map keeps each product's ranking: model-unified I-AUROC is the base's, the ceiling.
    assert oracle["model-unified"]["i_auroc"] == pytest.approx(base["model-unified"]["i_auroc"])
    assert oracle["absolute-unified"]["p_auroc"] is None  # image metrics only
    assert set(results["per_product"]) == {"none", DEFAULT_ALIGN, "oracle"}
    config = json.loads((calibrated_run / "config.json").read_text())
    assert results["per_product"][DEFAULT_ALIGN]["threshold"] == config["calibration"]["threshold"]
    assert results["per_product"]["oracle"]["threshold_source"] == "1% FPR on test normals"
    for product in ("weave", "marble", "washer", "circuit"):
        values = results["per_product"][DEFAULT_ALIGN]["products"][product]
        assert values["fpr"] == results["per_class"][DEFAULT_ALIGN][product]["fpr"]  # the same decisions as per_class
        assert values["recall"] == results["per_class"][DEFAULT_ALIGN][product]["recall"]
        assert values["median_normal_score"] is not None
        assert f"    {product:<16} median normal" in printed
    assert "oracle" in printed


def test_knn_run_reports_and_flags_unfamiliar_images(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--image-size", "64", "--iters", "3",
                 "--align", "knn", "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(run), str(tiny_data / "washer" / "test"), "--out", str(out), "--quiet"]) == 0
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"path", "score", "anomalous", "nearest_distance", "unfamiliar"}
    report = json.loads((out / "predictions.json").read_text())
    reference = report["unfamiliar_reference_distance"]
    assert reference > 0 and report["n_unfamiliar"] == sum(int(r["unfamiliar"]) for r in rows)
    assert all(int(r["unfamiliar"]) == (float(r["nearest_distance"]) > reference) for r in rows)
    # The exported graph carries the knn alignment (the training descriptors are constants in it).
    onnx_file = export_onnx(Detector.load(run), tmp_path / "knn.onnx")
    scorer, _, _, _ = onnx_scorer(onnx_file)
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    scores, _ = scorer(images)
    assert torch.allclose(scores, Detector.load(run).predict(images).scores, atol=1e-4)
