"""Aspect-preserving input (`--resize letterbox`): recorded in the run, used by every path that reads images."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cada import Detector
from cada.cli import main
from cada.config import Settings
from cada.data.resize import crop_to_content, resize_rgb

from helpers import train_args

WIDE = (96, 64)  # width, height of every image of `wide_data`


@pytest.fixture(scope="module")
def wide_data(tiny_data, tmp_path_factory):
    """`tiny_data` with every image and mask stretched to 96 x 64: not square, as camera images are."""
    root = tmp_path_factory.mktemp("wide") / "data"
    for path in tiny_data.rglob("*.png"):
        target = root / path.relative_to(tiny_data)
        target.parent.mkdir(parents=True, exist_ok=True)
        filter = Image.Resampling.NEAREST if "ground_truth" in path.parts else Image.Resampling.BILINEAR
        Image.open(path).resize(WIDE, filter).save(target)
    return root


@pytest.fixture(scope="module")
def letterbox_run(wide_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("letterbox") / "run"
    assert main(train_args(wide_data, run, "--resize", "letterbox", "--holdout", "0.2", iters=3, align_iters=5)) == 0
    return run


def test_the_run_records_letterbox_and_predicts_through_it(letterbox_run, wide_data):
    assert json.loads((letterbox_run / "config.json").read_text())["settings"]["resize"] == "letterbox"
    detector = Detector.load(letterbox_run)
    paths = sorted((wide_data / "marble" / "test").rglob("*.png"))[:4]
    from_paths = detector.predict([str(p) for p in paths])
    boxed = torch.stack([resize_rgb(np.asarray(Image.open(p).convert("RGB")), 64, "letterbox") for p in paths])
    assert torch.equal(from_paths.scores, detector.predict(boxed).scores)
    squashed = torch.stack([resize_rgb(np.asarray(Image.open(p).convert("RGB")), 64) for p in paths])
    assert not torch.equal(from_paths.scores, detector.predict(squashed).scores)


def test_full_size_masks_leave_the_padding_out(letterbox_run, wide_data, tmp_path):
    """The map is cropped to the image before it is upsampled to 96 x 64: the written mask is that crop's."""
    folder, out = wide_data / "washer" / "test" / "good", tmp_path / "out"  # file names unique in the folder
    args = ["predict", str(letterbox_run), str(folder), "--out", str(out), "--masks", "--overlays", "--quiet"]
    assert main([*args, "--threshold", "0.5"]) == 0  # masks with pixels on both sides
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    assert {(r["width"], r["height"]) for r in rows} == {WIDE}
    detector = Detector.load(letterbox_run)
    for row in rows:
        name = row["path"].rsplit("/", 1)[-1].removesuffix(".png")
        written = np.array(Image.open(out / "masks" / f"{name}.png")) > 0
        assert np.array(Image.open(out / "overlays" / f"{name}.png")).shape == (64, 96, 3)
        aligned_map = detector.predict(row["path"]).maps[0]
        cropped = crop_to_content(aligned_map, *WIDE, "letterbox")[None, None]
        expected = F.interpolate(cropped, size=(64, 96), mode="bilinear", align_corners=False)[0, 0]
        assert 0 < written.mean() < 1
        assert ((expected.numpy() >= 0.5) == written).mean() > 0.999  # float rounding at the threshold only


def test_evaluate_at_the_original_resolution(letterbox_run, wide_data, tmp_path):
    out = tmp_path / "results.json"
    args = ["evaluate", str(letterbox_run), "--data", str(wide_data), "--json", str(out), "--quiet"]
    assert main([*args, "--pixel-resolution", "original"]) == 0
    results = json.loads(out.read_text())
    assert results["meta"]["resize"] == "letterbox"
    assert all(0 <= row["p_auroc"] <= 1 for row in results["rows"] if row.get("p_auroc") is not None)


@pytest.mark.slow
def test_raw_graph_letterboxes_as_training(letterbox_run, wide_data, tmp_path):
    """The exported raw-image graph pads as `resize_rgb` does, for any image size: the scores of the PyTorch path."""
    import onnxruntime

    from cada.export import export_onnx

    detector = Detector.load(letterbox_run)
    onnx_file = export_onnx(detector, tmp_path / "raw.onnx", input="raw")
    assert "letterbox" in json.loads((tmp_path / "raw.json").read_text())["preprocessing"]["fit"]
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for path in sorted((wide_data / "circuit" / "test").rglob("*.png"))[::3]:
        height, width = (int(side) for side in rng.integers(20, 300, size=2))
        rgb = np.asarray(Image.open(path).convert("RGB").resize((width, height)))
        score, aligned_map, *_ = session.run(None, {"image": rgb})
        expected = detector.predict(resize_rgb(rgb, 64, "letterbox")[None])
        assert abs(float(score[0]) - float(expected.scores[0])) <= 1e-4, (height, width)
        assert np.abs(aligned_map - expected.maps.numpy()).max() <= 1e-4


def test_a_bad_resize_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    with pytest.raises(ValueError, match="resize must be one of squash, letterbox"):
        Settings(resize="crop").validate()
    assert main(train_args(tiny_data, tmp_path / "run", "--resize", "crop")) == 2
    assert "invalid choice: 'crop'" in capsys.readouterr().err


def test_the_service_letterboxes_and_overlays_the_image_alone(letterbox_run, wide_data):
    """`cada serve` scores as `Detector.predict` on the same file; its overlay is at the image's own size."""
    import base64
    import io
    import json
    import urllib.request

    from cada.predict import load_model
    from cada.serve import BackgroundServer

    path = sorted((wide_data / "weave" / "test").rglob("*.png"))[-1]
    server = BackgroundServer(load_model(letterbox_run), str(letterbox_run))
    try:
        assert server.service.info()["resize"] == "letterbox"
        request = urllib.request.Request(server.url + "/predict?overlay=1", data=path.read_bytes())
        with urllib.request.urlopen(request, timeout=60) as answer:
            (row,) = json.loads(answer.read())["predictions"]
    finally:
        server.stop()
    assert row["score"] == pytest.approx(float(Detector.load(letterbox_run).predict(str(path)).scores[0]), abs=1e-5)
    assert np.array(Image.open(io.BytesIO(base64.b64decode(row["overlay_png"])))).shape == (64, 96, 3)
