"""Calibration, prediction on anonymous images, and the ONNX export, as a user runs them."""

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cada import Detector
from cada.align import ALIGNERS, KNNAligner
from cada.cli import main
from cada.config import preset
from cada.data.dataset import load_all
from cada.data.mvtec import mvtec_samples
from cada.export import export_onnx
from cada.runtime import exported_scorer

from helpers import train_args

DEFAULT_ALIGN = preset("cpu").align  # what `cada train` aligns with unless told


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
    assert (
        main(["predict", str(calibrated_run), str(images), "--out", str(out), "--overlays", "--masks", "--quiet"]) == 0
    )
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    aligner = ALIGNERS[DEFAULT_ALIGN].cls
    extra = {"nearest_distance", "unfamiliar"} if issubclass(aligner, KNNAligner) else set()  # unfamiliar signal
    extra |= {"score_offset"} if aligner.has_score_offset else set()  # knn-distance: the score is more than the map
    assert len(rows) == 5 and set(rows[0]) == {"path", "score", "anomalous", "width", "height", "u", "spread", *extra}
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
    scorer, size, threshold, _ = exported_scorer(onnx_file)
    assert size == 64 and threshold == detector.threshold
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    expected = detector.predict(images)
    scores, maps, _ = scorer(images)
    assert (maps - expected.maps).abs().max().item() <= 1e-4
    assert torch.equal(scores >= threshold, expected.decisions)


@pytest.mark.slow
def test_raw_image_graph_resizes_as_training_and_scores_the_same(calibrated_run, tiny_data, tmp_path):
    """The raw graph takes each image at its own size (here enlarged, shrunk and stretched copies of test images)
    and gives the scores of the PyTorch path, which resizes with Pillow."""
    import onnxruntime

    from cada.data.resize import resize_rgb

    detector = Detector.load(calibrated_run)
    onnx_file = export_onnx(detector, tmp_path / "raw.onnx", input="raw")
    assert json.loads((tmp_path / "raw.json").read_text())["input_kind"] == "raw"
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for sample in mvtec_samples(tiny_data, "test")[::7]:
        rgb = np.asarray(Image.open(sample.path).convert("RGB"))
        height, width = (int(side) for side in rng.integers(20, 300, size=2))
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height)))
        score, aligned_map, *_ = session.run(None, {"image": rgb})
        expected = detector.predict(resize_rgb(rgb, 64)[None])
        assert abs(float(score[0]) - float(expected.scores[0])) <= 1e-4, (height, width)
        assert np.abs(aligned_map - expected.maps.numpy()).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("format, suffix, tolerance", [("onnx", ".onnx", 1e-4), ("openvino", ".xml", 1e-4)])
def test_predict_runs_an_exported_model_with_the_same_outputs(
    calibrated_run, tiny_data, tmp_path, format, suffix, tolerance
):
    folder = tiny_data / "marble" / "test"
    assert main(["predict", str(calibrated_run), str(folder), "--out", str(tmp_path / "torch"), "--quiet"]) == 0
    expected = json.loads((tmp_path / "torch" / "predictions.json").read_text())["predictions"]
    for kind in ("resized", "raw"):
        model = tmp_path / f"{kind}{suffix}"
        assert main(["export", str(calibrated_run), "--format", format, "--out", str(model), "--input", kind]) == 0
        assert main(["predict", str(model), str(folder), "--out", str(tmp_path / kind), "--quiet"]) == 0
        rows = json.loads((tmp_path / kind / "predictions.json").read_text())["predictions"]
        assert [r["path"] for r in rows] == [r["path"] for r in expected]
        assert [r["anomalous"] for r in rows] == [r["anomalous"] for r in expected]
        assert rows[0].keys() == expected[0].keys()  # u, spread and the unfamiliar-product columns too
        for column in ("score", "u", "spread", "score_offset", "nearest_distance"):
            assert np.allclose([r[column] for r in rows], [r[column] for r in expected], atol=tolerance), column
        reference = json.loads((tmp_path / kind / "predictions.json").read_text())["unfamiliar_reference_distance"]
        clear = [abs(r["nearest_distance"] - reference) > tolerance for r in expected]  # not on the edge
        assert [r["unfamiliar"] for r, c in zip(rows, clear) if c] == [
            r["unfamiliar"] for r, c in zip(expected, clear) if c
        ]


def test_predictions_carry_u_spread_and_offset_that_give_the_aligned_score(calibrated_run, tiny_data, tmp_path):
    out = tmp_path / "out"
    folder = tiny_data / "washer" / "test"
    assert main(["predict", str(calibrated_run), str(folder), "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    images, samples = load_all([s for s in mvtec_samples(tiny_data, "test") if s.class_name == "washer"], 64)
    result = Detector.load(calibrated_run).infer(images)
    assert result.offset is not None  # the default aligner, knn-distance, scores the image as a whole too
    values = zip(result.base_scores.tolist(), result.u.tolist(), result.spread.tolist(), result.offset.tolist())
    base = {str(sample.path): value for sample, value in zip(samples, values)}
    assert len(rows) == len(base) > 0
    for row in rows:
        base_score, u, spread, offset = base[row["path"]]
        assert row["spread"] > 0 and row["u"] == pytest.approx(u) and row["spread"] == pytest.approx(spread)
        assert row["score_offset"] == pytest.approx(offset)
        assert row["score"] == pytest.approx((base_score - row["u"]) / row["spread"] + offset, abs=1e-5)
    # the maps are aligned by u and spread alone: the offset is the image's, not its pixels'
    assert torch.allclose(result.aligned_maps, (result.maps - result.u[:, None, None]) / result.spread[:, None, None])


def test_evaluate_reports_decisions_at_the_stored_threshold(calibrated_run, tiny_data, tmp_path, capsys):
    assert (
        main(["evaluate", str(calibrated_run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"), "--quiet"])
        == 0
    )
    assert "at the stored threshold" in capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    for row in results["rows"]:
        for key in ("fpr", "recall", "precision", "f1", "class_fpr_min", "class_fpr_max", "threshold"):
            assert key in row
        assert row["class_fpr_min"] <= row["class_fpr_max"]
    assert "fpr" in results["per_class"][DEFAULT_ALIGN]["weave"]


def test_evaluate_shows_the_oracle_and_each_product_at_one_threshold(calibrated_run, tiny_data, tmp_path, capsys):
    assert (
        main(["evaluate", str(calibrated_run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"), "--quiet"])
        == 0
    )
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
    assert main(train_args(tiny_data, run, "--align", "knn", iters=3)) == 0
    out = tmp_path / "out"
    assert main(["predict", str(run), str(tiny_data / "washer" / "test"), "--out", str(out), "--quiet"]) == 0
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {
        "path",
        "score",
        "anomalous",
        "width",
        "height",
        "u",
        "spread",
        "nearest_distance",
        "unfamiliar",
    }
    report = json.loads((out / "predictions.json").read_text())
    reference = report["unfamiliar_reference_distance"]
    assert reference > 0 and report["n_unfamiliar"] == sum(int(r["unfamiliar"]) for r in rows)
    assert all(int(r["unfamiliar"]) == (float(r["nearest_distance"]) > reference) for r in rows)
    # The exported graph carries the knn alignment (the training descriptors are constants in it).
    onnx_file = export_onnx(Detector.load(run), tmp_path / "knn.onnx")
    scorer, _, _, _ = exported_scorer(onnx_file)
    images, _ = load_all(mvtec_samples(tiny_data, "test"), 64)
    scores, _, _ = scorer(images)
    assert torch.allclose(scores, Detector.load(run).predict(images).scores, atol=1e-4)


def test_predict_changes_the_operating_point_without_recalibrating(calibrated_run, tiny_data, tmp_path, capsys):
    config = json.loads((calibrated_run / "config.json").read_text())
    calibration = config["calibration"]
    assert len(calibration["normal_scores"]) == calibration["n_normal"] == 24
    folder = str(tiny_data / "washer" / "test")

    def predict(name, *options):
        assert main(["predict", str(calibrated_run), folder, "--out", str(tmp_path / name), "--quiet", *options]) == 0
        return json.loads((tmp_path / name / "predictions.json").read_text()), capsys.readouterr().out

    stored, printed = predict("stored")
    assert stored["threshold"] == calibration["threshold"] and "stored in the run" in stored["threshold_source"]
    assert f"threshold {calibration['threshold']:.4f}, stored in the run" in printed
    # The calibrated rate again: the same threshold, bit for bit, from the stored scores.
    same, printed = predict("same", "--fpr", "0.1")
    assert same["threshold"] == calibration["threshold"] and "over the 24 calibration scores" in printed
    # A higher rate flags more: the threshold sits lower, among the stored normal scores.
    loose, _ = predict("loose", "--fpr", "0.5")
    assert loose["threshold"] < calibration["threshold"]
    assert sum(s >= loose["threshold"] for s in calibration["normal_scores"]) <= 12
    assert loose["n_anomalous"] >= stored["n_anomalous"]
    # A rate 24 images cannot hold: above all of them, and said so.
    with pytest.warns(UserWarning, match="24 normal images cannot resolve a false-positive rate of 0.01"):
        strict, _ = predict("strict", "--fpr", "0.01")
    assert strict["threshold"] > max(calibration["normal_scores"])
    given, _ = predict("given", "--threshold=-1e6")
    assert given["threshold"] == -1e6 and given["n_anomalous"] == given["n_images"]
    assert given["threshold_source"] == "given with --threshold"
    assert all(row["anomalous"] for row in given["predictions"])


def test_the_command_line_writes_a_warning_as_one_line(calibrated_run, tiny_data, tmp_path):
    """As a user sees it (a process of its own, where pytest does not catch warnings): no source path, no code line."""
    command = [sys.executable, "-m", "cada", "predict", str(calibrated_run), str(tiny_data / "washer" / "test")]
    finished = subprocess.run(
        [*command, "--out", str(tmp_path / "out"), "--fpr", "0.01", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr.splitlines() == [
        "cada predict: warning: 24 normal images cannot resolve a false-positive rate of 0.01: the threshold is set "
        "above all of them, and a new normal image scores above all 24 with probability 1/25 = 0.04 (use at least 99 "
        "images)"
    ]


def test_predict_fpr_needs_stored_calibration_scores(tiny_data, calibrated_run, tmp_path, capsys):
    from cada.checkpoint import update_config

    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    old = json.loads((run / "config.json").read_text())["calibration"]
    update_config(run, calibration={k: v for k, v in old.items() if k != "normal_scores"})  # an older run
    folder = str(tiny_data / "washer" / "test")
    capsys.readouterr()
    assert main(["predict", str(run), folder, "--out", str(tmp_path / "a"), "--fpr", "0.05", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "--fpr needs the calibration scores stored in the run" in error and "cada calibrate" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "a" / "predictions.csv").exists()
    update_config(run, calibration=None)
    assert main(["predict", str(run), folder, "--out", str(tmp_path / "b"), "--fpr", "0.05", "--quiet"]) == 2
    assert "has no calibration" in capsys.readouterr().err
    # The stored threshold still works; --threshold needs no calibration at all.
    assert (
        main(["predict", str(run), folder, "--out", str(tmp_path / "c"), "--threshold", "1.5", "--masks", "--quiet"])
        == 0
    )
    assert json.loads((tmp_path / "c" / "predictions.json").read_text())["threshold"] == 1.5
    # argparse: one or the other
    assert main(["predict", str(run), folder, "--out", str(tmp_path / "d"), "--fpr", "0.1", "--threshold", "1"]) == 2
    assert main(["predict", str(run), folder, "--out", str(tmp_path / "e"), "--threshold", "nan"]) == 2
    assert "--threshold must be a finite number" in capsys.readouterr().err


def test_exported_model_changes_the_operating_point_too(calibrated_run, tiny_data, tmp_path):
    assert main(["export", str(calibrated_run), "--out", str(tmp_path / "model.onnx")]) == 0
    folder = str(tiny_data / "washer" / "test")
    assert (
        main(["predict", str(tmp_path / "model.onnx"), folder, "--out", str(tmp_path / "a"), "--fpr", "0.5", "--quiet"])
        == 0
    )
    assert main(["predict", str(calibrated_run), folder, "--out", str(tmp_path / "b"), "--fpr", "0.5", "--quiet"]) == 0
    a, b = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("a", "b"))
    assert (
        a["threshold"]
        == b["threshold"]
        < json.loads((calibrated_run / "config.json").read_text())["calibration"]["threshold"]
    )
    assert [r["anomalous"] for r in a["predictions"]] == [r["anomalous"] for r in b["predictions"]]


def test_upsampled_strips_match_torch_bilinear():
    from cada.predict import upsampled_strips

    small = torch.rand(16, 12, generator=torch.Generator().manual_seed(0)) * 3 - 1
    for height, width in ((16, 12), (37, 100), (600, 5), (3, 2)):
        expected = torch.nn.functional.interpolate(
            small[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        strips = list(upsampled_strips(small, height, width, rows=7))
        assert [start for start, _ in strips] == list(range(0, height, 7))
        assert np.allclose(np.concatenate([strip for _, strip in strips]), expected, atol=1e-5)


def test_overlays_and_masks_at_each_images_own_size(calibrated_run, tiny_data, tmp_path):
    source = sorted((tiny_data / "washer" / "test").rglob("*.png"))[-1]
    images = tmp_path / "line"
    images.mkdir()
    sizes = {"wide": (150, 40), "tall": (33, 90), "same": (64, 64)}
    for name, size in sizes.items():
        Image.open(source).convert("RGB").resize(size).save(images / f"{name}.png")
    detector = Detector.load(calibrated_run)
    # A threshold through the middle of one map: the masks have both sides to get right.
    threshold = float(detector.predict(str(images / "wide.png")).maps.median())
    options = ["--overlays", "--masks", "--quiet", f"--threshold={threshold!r}"]
    assert main(["predict", str(calibrated_run), str(images), "--out", str(tmp_path / "full"), *options]) == 0
    assert (
        main(
            [
                "predict",
                str(calibrated_run),
                str(images),
                "--out",
                str(tmp_path / "small"),
                "--output-size",
                "model",
                *options,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "full" / "predictions.json").read_text())
    assert report["output_size"] == "original" and report["threshold"] == threshold
    for row in report["predictions"]:
        name = row["path"].rsplit("/", 1)[-1].removesuffix(".png")
        assert (row["width"], row["height"]) == sizes[name]
        overlay = Image.open(tmp_path / "full" / "overlays" / f"{name}.png")
        mask = np.array(Image.open(tmp_path / "full" / "masks" / f"{name}.png"))
        assert overlay.size == sizes[name] and mask.shape == sizes[name][::-1]
        assert Image.open(tmp_path / "small" / "overlays" / f"{name}.png").size == (64, 64)
        # The mask is the model's map upsampled bilinearly to the image's size, then thresholded.
        aligned_map = detector.predict(row["path"]).maps
        expected = torch.nn.functional.interpolate(
            aligned_map[None], size=sizes[name][::-1], mode="bilinear", align_corners=False
        )[0, 0].numpy()
        decided = np.abs(expected - threshold) > 1e-4  # pixels not on the threshold within rounding
        assert np.array_equal((mask == 255)[decided], (expected >= threshold)[decided])
        if name == "wide":
            assert set(np.unique(mask)) == {0, 255}
    with open(tmp_path / "full" / "predictions.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:5] == ["path", "score", "anomalous", "width", "height"]


def test_a_threshold_set_by_hand_in_the_sidecar_is_the_one_used_and_said(calibrated_run, tiny_data, tmp_path, capsys):
    from cada.predict import load_model

    export_onnx(Detector.load(calibrated_run), tmp_path / "model.onnx")
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert load_model(tmp_path / "model.onnx").threshold_source.startswith("stored in model.json: at false-positive")
    sidecar["threshold"] = 0.25
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    model = load_model(tmp_path / "model.onnx")
    assert model.threshold == 0.25
    assert model.threshold_source == "stored in model.json: from its threshold field, set by hand"
    assert load_model(tmp_path / "model.onnx", fpr=0.1).threshold == sidecar["calibration"]["threshold"]


@pytest.mark.slow
def test_a_damaged_openvino_model_gets_one_line(calibrated_run, tiny_data, tmp_path, capsys):
    model = tmp_path / "model.xml"
    assert main(["export", str(calibrated_run), "--format", "openvino", "--out", str(model)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"model.xml", "model.bin", "model.json"}  # no scratch left
    model.with_suffix(".bin").write_bytes(b"not weights")
    folder = str(tiny_data / "marble" / "test")
    assert main(["predict", str(model), folder, "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "not a model OpenVINO can load" in capsys.readouterr().err
    assert main(["predict", str(model), folder, "--out", str(tmp_path / "p"), "--device", "cuda"]) == 2
    assert "runs on the CPU" in capsys.readouterr().err


def test_int8_openvino_scores_stay_near_float32(calibrated_run, tiny_data, tmp_path):
    """`--int8`: the encoder and decoder quantised (NNCF, calibrated on the run's training images), the rest float32.
    On this 3-step tiny run the aligned scores (0.2 - 1.5) move by 0.05 at the median and 0.11 at most (measured);
    on trained runs, docs/results/export-and-speed.md."""
    pytest.importorskip("nncf")
    folder = tiny_data / "washer" / "test"
    scores = {}
    for name, extra in (("fp32", []), ("int8", ["--int8"])):
        model = tmp_path / f"{name}.xml"
        assert main(["export", str(calibrated_run), "--format", "openvino", "--out", str(model), *extra]) == 0
        assert main(["predict", str(model), str(folder), "--out", str(tmp_path / name), "--quiet"]) == 0
        rows = json.loads((tmp_path / name / "predictions.json").read_text())["predictions"]
        scores[name] = np.array([row["score"] for row in rows])
    sidecar = json.loads((tmp_path / "int8.json").read_text())
    assert sidecar["precision"].startswith("int8: the encoder and decoder (but their first and depthwise")
    assert "quantised by NNCF on 24 normal images" in sidecar["precision"]
    model = (tmp_path / "int8.xml").read_text()
    assert "FakeQuantize" in model and 'name="/method/bottleneck' in model  # quantised, bottleneck untouched
    assert not re.search(r'name="/method/bottleneck[^"]*/fq_', model)
    change = np.abs(scores["int8"] - scores["fp32"])
    assert np.median(change) <= 0.06 and change.max() <= 0.15


def test_int8_says_what_it_needs_in_one_line(calibrated_run, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "m.xml")
    assert main(["export", str(calibrated_run), "--int8", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--format openvino" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(calibrated_run),
                "--format",
                "openvino",
                "--int8",
                "--out",
                out,
                "--calibration-data",
                str(tmp_path / "nowhere"),
            ]
        )
        == 2
    )
    assert "nowhere" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed
    assert main(["export", str(calibrated_run), "--format", "openvino", "--int8", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "pip install nncf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.xml").exists()
