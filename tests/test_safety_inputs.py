"""Bad input is refused with a message naming it: decompression bombs, non-finite pixels, out-of-range or mistyped
settings, zero iterations, API misuse, thresholds on the edge, escaping paths, and every bad input a probe found."""

import json
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cada import Detector
from cada.api import NotFittedError
from cada.checkpoint import IncompatibleRunError
from cada.cli import build_parser, main
from cada.config import Settings, preset
from cada.data.dataset import BadImageError, image_size_of, iterate_batches, load_all, load_image
from cada.data.mvtec import Sample, mvtec_samples
from cada.data.visa import visa_samples
from cada.threshold import threshold_at_fpr, threshold_f1

from helpers import train_args

CLASSES = ("weave", "marble", "washer", "circuit")


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A trained run calibrated at FPR 0.1 on the training images of every class (the calibration images)."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(tiny_data, folder)) == 0
    assert (
        main(
            [
                "calibrate",
                str(folder),
                "--normal",
                *(str(tiny_data / c / "train" / "good") for c in CLASSES),
                "--fpr",
                "0.1",
            ]
        )
        == 0
    )
    return folder


def png_claiming(path, width: int, height: int):
    """A few-byte PNG whose header claims width x height pixels: a decompression bomb, without its payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def skipped_messages(samples, size=64, **options):
    """(indices of the images read, the 'skipped: ...' warnings) of iterate_batches without a cache."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = [
            i for batch in iterate_batches(samples, size, cache_dir=None, **options) for i in batch["index"].tolist()
        ]
    return read, [str(w.message) for w in caught if str(w.message).startswith("skipped:")]


# -- decompression bombs -----------------------------------------------------------------------------------------------
def test_decompression_bomb_is_skipped_with_its_path_and_the_good_images_are_scored(
    tiny_data, tmp_path, run, monkeypatch, capsys
):
    bomb = png_claiming(tmp_path / "bomb.png", 60000, 60000)
    good = sorted((tiny_data / "washer" / "test" / "good").glob("*.png"))
    samples = [Sample(good[0], 0, ""), Sample(bomb, 0, ""), Sample(good[1], 0, "")]
    read, skipped = skipped_messages(samples)
    assert read == [0, 2] and len(skipped) == 1 and str(bomb) in skipped[0] and "CADA_MAX_IMAGE_PIXELS" in skipped[0]
    with pytest.raises(BadImageError, match="bomb.png.*limit of 100,000,000 pixels"):
        list(iterate_batches(samples, 64, cache_dir=None, strict=True))
    with pytest.raises(BadImageError, match="bomb.png"):
        image_size_of(bomb)
    # Between the limit and twice it PIL only warns; cada refuses it all the same.
    with pytest.raises(BadImageError, match="limit"):
        load_image(png_claiming(tmp_path / "just_over.png", 10001, 10000), 64)
    # The predict command scores the good images and lists the bomb.
    folder = tmp_path / "line"
    folder.mkdir()
    for path in (bomb, *good[:2]):
        (folder / path.name).write_bytes(path.read_bytes())
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["n_images"] == 2 and "bomb.png" in report["skipped"][0]
    # The limit is documented and can be raised: then the file is decoded (and found to be empty).
    monkeypatch.setenv("CADA_MAX_IMAGE_PIXELS", str(4_000_000_000))
    with pytest.raises(BadImageError) as raised:
        load_image(bomb, 64)
    assert "limit" not in str(raised.value)
    monkeypatch.setenv("CADA_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="CADA_MAX_IMAGE_PIXELS must be a positive whole number"):
        list(iterate_batches(samples, 64, cache_dir=None))


# -- settings ----------------------------------------------------------------------------------------------------------
BAD_SETTINGS = [
    ("image_size", 100000, r"image_size must be an integer in \[64, 1024\], got 100000"),
    ("image_size", "256", r"image_size must be an integer .* got '256'"),
    ("image_size", 96 + 16, "image_size must be a multiple of 32"),
    ("aligner.hidden", 1e7, r"aligner.hidden must be an integer in \[1, 4096\], got 10000000.0"),
    ("smoothing_sigma", -4, r"smoothing_sigma must be a finite number in \[0, 16\], got -4"),
    ("base.lr", float("nan"), "base.lr must be a finite number .* got nan"),
    ("base.lr", "fast", "base.lr must be a finite number .* got 'fast'"),
    ("base.batch_size", True, "base.batch_size must be an integer .* got True"),
    ("base.batch_size", 0, r"base.batch_size must be an integer in \[1, 4096\], got 0"),
    ("aligner.lr", float("inf"), "aligner.lr must be a finite number"),
    ("base.betas", [0.9, 1.5], r"base.betas must be a list of 2 finite numbers in \[0, 1\)"),
    ("base.lr_drop_at", [0.5, 2], r"base.lr_drop_at must be .* in \(0, 1\], got \[0.5, 2\]"),
    ("base.amsgrad", "yes", "base.amsgrad must be true or false"),
    ("top_fraction", 2, r"top_fraction must be a finite number in \[0, 1\]"),
    ("aligner.dropout", 1.0, r"aligner.dropout must be a finite number in \[0, 1\)"),
    ("patchcore.coreset_ratio", 0, r"patchcore.coreset_ratio must be a finite number in \(0, 1\]"),
    ("method", 3, "method must be a string"),
    ("method", "magic", "unknown method 'magic'"),
    ("aligner", 3, "aligner must be a mapping"),
    ("base.speed", 1, r"unknown settings \['base.speed'\]"),
]


def _with(data: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *blocks, name = dotted.split(".")
    inner = data
    for block in blocks:
        inner = inner[block]
    inner[name] = value
    return data


@pytest.mark.parametrize("dotted, value, message", BAD_SETTINGS)
def test_settings_are_checked_field_by_field_from_a_dict(dotted, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_dict(_with(preset("cpu").to_dict(), dotted, value))


def test_settings_are_checked_from_python_and_from_the_cli(tiny_data, tmp_path, capsys):
    settings = preset("cpu")
    settings.aligner.hidden = 10**7
    with pytest.raises(ValueError, match=r"aligner.hidden must be an integer in \[1, 4096\]"):
        Detector(settings, pretrained=False)
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--image-size", "4096"]) == 2
    assert capsys.readouterr().err.strip().endswith(r"image_size must be an integer in [64, 1024], got 4096")
    for preset_name in ("cpu", "paper"):  # every shipped preset passes its own checks
        for method in ("revdist", "recontrast", "uniad", "patchcore", "draem", "cfa"):
            assert Settings.from_dict(json.loads(json.dumps(preset(preset_name, method).to_dict()))) == preset(
                preset_name, method
            )


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("settings.smoothing_sigma", -4, "smoothing_sigma must be a finite number"),
        ("settings.aligner.hidden", 1e7, "aligner.hidden must be an integer"),
        ("calibration.threshold", float("nan"), "calibration.threshold must be a finite number, got nan"),
        ("calibration.threshold", "0.5", "calibration.threshold must be a finite number, got '0.5'"),
        ("calibration.base_threshold", None, "calibration.base_threshold must be a finite number"),
    ],
)
def test_a_run_with_a_bad_config_is_refused_on_load(run, tmp_path, capsys, dotted, value, message):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    config = _with(json.loads((run / "config.json").read_text()), dotted, value)
    (folder / "config.json").write_text(json.dumps(config))  # NaN is written as JSON's NaN, which json reads back
    with pytest.raises(IncompatibleRunError, match=message):
        Detector.load(folder)
    assert main(["predict", str(folder), str(run), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "config.json" in error and "Traceback" not in error


# -- non-finite pixels -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_float_tiff_with_a_non_finite_pixel_is_skipped_with_its_path(tmp_path, bad):
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(pixels, mode="F").save(tmp_path / "fine.tif")
    pixels[10, 10] = bad
    Image.fromarray(pixels, mode="F").save(tmp_path / "broken.tif")
    assert Image.open(tmp_path / "broken.tif").mode == "F"
    read, skipped = skipped_messages([Sample(tmp_path / "fine.tif", 0, ""), Sample(tmp_path / "broken.tif", 0, "")])
    assert read == [0] and len(skipped) == 1
    assert "broken.tif" in skipped[0] and "NaN or infinite" in skipped[0]
    with pytest.raises(BadImageError, match="broken.tif"):
        load_all([Sample(tmp_path / "broken.tif", 0, "")], 64, strict=True, cache_dir=None)


def test_16_and_32_bit_images_keep_their_contrast_or_are_refused(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray((ramp * 65535).astype(np.int32)).save(tmp_path / "thirty_two.tif")
    for name in ("sixteen.png", "thirty_two.tif"):
        image, _ = load_image(tmp_path / name, 64)
        assert image.min() == 0 and image.max() == 255  # the full range, not saturated or black
    # 32-bit values beyond 16 bits have no fixed 8-bit scale: clipping would silently saturate them.
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(BadImageError, match="wide.tif.*outside 0-65535"):
        load_image(tmp_path / "wide.tif", 64)


# -- zero iterations ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["train", "--data", "missing", "--out", "o", "--iters", "0"],
        ["train", "--data", "missing", "--out", "o", "--align-iters", "0"],
        ["ablate", "--data", "missing", "--out", "o", "--align-iters", "0"],
        ["demo", "--out", "o", "--iters", "0"],
    ],
)
def test_zero_iterations_are_an_error_not_the_preset(command, capsys):
    assert main(command) == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_an_aligner_that_trains_needs_iterations():
    settings = preset("cpu")
    settings.align, settings.aligner.iters = "cada", 0
    with pytest.raises(ValueError, match="aligner.iters must be at least 1: the cada aligner is trained"):
        settings.validate()
    settings.align = "none"  # nothing to train: 0 is fine
    settings.validate()
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--image-size", "0"])
    from cada.config_files import settings_from_options

    with pytest.raises(ValueError, match="image_size"):  # 0 is a value, not "the preset's"
        settings_from_options(vars(args))


# -- the Python API ----------------------------------------------------------------------------------------------------
def test_an_unfitted_detector_refuses_to_predict_calibrate_infer_or_save(tiny_settings, images, tmp_path):
    detector = Detector(tiny_settings(), pretrained=False)
    for call in (
        lambda: detector.predict(images[:2]),
        lambda: detector.infer(images[:2]),
        lambda: detector.calibrate(images[:2]),
        lambda: detector.calibrate_f1(images[:2], [0, 1]),
        lambda: detector.save(tmp_path / "run"),
    ):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            call()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert not (tmp_path / "run").exists()


def test_predict_accepts_numpy_channels_last_floats_and_paths_and_refuses_the_rest(run, tiny_data):
    detector = Detector.load(run)
    paths = sorted((tiny_data / "marble" / "test").rglob("*.png"))[:3]
    images, _ = load_all([Sample(p, 0, "") for p in paths], 64, cache_dir=None)
    expected = detector.predict(images).scores
    channels_last = images.permute(0, 2, 3, 1).numpy()
    for same in (channels_last, images.float() / 255, channels_last / 255.0, paths, [str(p) for p in paths]):
        assert torch.equal(detector.predict(same).scores, expected)
    batches = detector.predict([images[:2], channels_last[2:]]).scores  # an iterable of batches
    assert torch.allclose(batches, expected, atol=1e-5)  # other batch sizes: other float rounding
    first = detector.predict(images[0]).scores  # one image, channels first
    assert torch.equal(detector.predict(channels_last[0]).scores, first)  # one HWC image
    assert torch.equal(detector.predict(str(paths[0])).scores, first)  # one path
    bad = [
        (images.float(), r"float images must be in \[0, 1\].* got values in \[95, 255\]; pass 0-255 images as uint8"),
        (torch.full((1, 3, 64, 64), math.nan), "NaN or infinite"),
        (torch.zeros(2, 3, 128, 128, dtype=torch.uint8), "images are 128x128 pixels but this run takes 64x64"),
        (torch.zeros(2, 64, 64, dtype=torch.uint8), r"shape \(2, 64, 64\) are not RGB images"),
        (images.int() * 2, "integer images must be in 0-255"),
        ("not a path at all.png", "cannot read image not a path at all.png"),
        ([[1, 2], [3]], "images must be a torch tensor, a NumPy array or file paths, got list"),
        (42, "images must be a torch tensor, a NumPy array or file paths, got int"),
        ([], "no images given"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            detector.predict(value)
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        detector.calibrate_f1(images[:2], [0, 1, 1])


# -- thresholds with a margin, and split files that stay inside the data -----------------------------------------------
def test_threshold_has_a_margin_that_survives_rounding():
    scores = np.random.default_rng(0).random(50).astype(np.float32)
    for fpr in (0.0, 0.1, 0.5):
        threshold = threshold_at_fpr(scores, fpr)
        assert (scores >= threshold).sum() == max(0, math.floor(fpr * 51) - 1)
        assert np.abs(scores - threshold).min() > 1e-4  # ONNX vs PyTorch differ by ~1e-6
    labels = np.arange(50) % 2
    assert np.abs(scores - threshold_f1(scores, labels)).min() > 1e-4
    assert threshold_at_fpr(np.float32([0.5]), 0.0) > 0.5 + 1e-3  # one image: a margin all the same


def test_onnx_and_pytorch_decide_alike_on_the_calibration_images(run, tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    from cada.export import export_onnx
    from cada.runtime import exported_scorer

    detector = Detector.load(run)
    scorer, _, threshold, _ = exported_scorer(export_onnx(detector, tmp_path / "model.onnx"))
    calibration, _ = load_all([s for s in mvtec_samples(tiny_data, "train")], 64)
    expected = detector.predict(calibration)
    onnx_scores, _, _ = scorer(calibration)
    assert threshold == detector.threshold and torch.equal(onnx_scores >= threshold, expected.decisions)
    assert (expected.scores - threshold).abs().min() > 10 * (onnx_scores - expected.scores).abs().max()


@pytest.mark.parametrize("listed", ["../outside.png", "/etc/hostname", "bottle/../../outside.png"])
def test_visa_split_file_cannot_name_paths_outside_the_data(tmp_path, listed):
    root = tmp_path / "visa"
    (root / "bottle" / "Data" / "Images" / "Normal").mkdir(parents=True)
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "bottle,train,normal,bottle/Data/Images/Normal/0.JPG,\n"
        f"bottle,train,normal,{listed},\n"
    )
    with pytest.raises(ValueError, match=f"line 3: image path '{listed}' leaves the data folder"):
        visa_samples(root, "train")


# -- one line, before any work, for every bad input a probe found ------------------------------------------------------


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("cada ") and "Traceback" not in error, error
    return error


@pytest.mark.parametrize("content", [b"\x80\x04\x95pickled python objects", b"\x00\x01junk" * 500])
def test_weights_that_are_not_a_state_dict_get_one_line(tiny_data, tmp_path, capsys, content):
    import pickle

    weights = tmp_path / "weights.pth"
    weights.write_bytes(pickle.dumps({"layer": [1, 2, 3]}) if content.startswith(b"\x80") else content)
    assert main(train_args(tiny_data, tmp_path / "run", "--weights", str(weights))) == 2
    assert "cannot be read as a state dict of tensors" in _one_line_error(capsys)


def test_config_files_with_a_value_for_a_block_or_aliases_get_one_short_line(tiny_data, tmp_path, capsys):
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("base: 5\n")
    assert main(train_args(tiny_data, tmp_path / "a", "--config", str(scalar))) == 2
    assert "base must be a mapping of settings, got 5" in _one_line_error(capsys)

    # Nine levels of nested aliases inside a known key: 9**9 items once expanded (the whole memory, before).
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("base:\n  lr: [" + ", ".join(levels) + "]\n")
    assert main(train_args(tiny_data, tmp_path / "b", "--config", str(bomb))) == 2
    assert "aliases (*name) are not allowed" in _one_line_error(capsys)

    # A large value is named, not printed whole.
    large = tmp_path / "large.json"
    large.write_text(json.dumps({"base": {"lr": [[list(range(100))] * 100] * 100}}))
    assert main(train_args(tiny_data, tmp_path / "c", "--config", str(large))) == 2
    error = _one_line_error(capsys)
    assert "base.lr must be" in error and len(error) < 400


@pytest.mark.parametrize("fpr", ["1.5", "nan", "-0.1"])
def test_a_bad_fpr_is_refused_before_training_and_calibration(tiny_data, run, tmp_path, capsys, fpr):
    out = tmp_path / "run"
    assert main(train_args(tiny_data, out, "--holdout", "0.2", "--fpr", fpr)) == 2
    assert "--fpr must be a number in [0, 1)" in _one_line_error(capsys) and not out.exists()
    normal = str(tiny_data / "weave" / "train" / "good")
    assert main(["calibrate", str(run), "--normal", normal, "--fpr", fpr]) == 2
    assert "--fpr must be a number in [0, 1)" in _one_line_error(capsys)
    detector = Detector.load(run)
    with pytest.raises(ValueError, match="fpr must be a number"):
        detector.calibrate([normal + "/000.png"], fpr=float(fpr))


def test_bad_batch_sizes_and_ports_get_one_line(run, tiny_data, tmp_path, capsys):
    images = str(tiny_data / "weave" / "test" / "good")
    assert main(["predict", str(run), images, "--out", str(tmp_path / "p"), "--batch-size", "0"]) == 2
    assert "--batch-size: must be a positive integer, got 0" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        Detector.load(run).predict(images + "/000.png", batch_size=0)
    assert main(["serve", str(run), "--port", "99999"]) == 2
    assert "--port must be in 0-65535" in _one_line_error(capsys)
    assert main(["train", "--data", str(tiny_data)]) == 2  # a usage mistake: one line too, not the usage text
    assert "the following arguments are required: --out" in _one_line_error(capsys)


def test_a_csv_cell_that_a_spreadsheet_would_run_is_written_as_text(run, tiny_data, tmp_path, monkeypatch):
    import csv

    folder = tmp_path / "line"
    folder.mkdir()
    for name in ("=HYPERLINK(1).png", "+1.png", "plain.png"):
        (folder / name).write_bytes((tiny_data / "weave" / "test" / "good" / "000.png").read_bytes())
    monkeypatch.chdir(folder)  # paths as given: "=HYPERLINK(1).png" begins the cell
    assert main(["predict", str(run), *sorted(p.name for p in folder.iterdir()), "--out", "../p", "--quiet"]) == 0
    cells = sorted(row["path"] for row in csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert cells == ["'+1.png", "'=HYPERLINK(1).png", "plain.png"]
    names = sorted(p["path"] for p in json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"])
    assert names == ["+1.png", "=HYPERLINK(1).png", "plain.png"]  # the JSON keeps the names as they are


def test_masks_without_an_image_and_test_sets_without_normals_are_said(run, tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    truth = next((data / "weave" / "ground_truth").iterdir())
    shutil.copy(next(truth.iterdir()), truth / "999_mask.png")
    with pytest.warns(UserWarning, match="1 mask file.s. match no image in .*999_mask.png"):
        mvtec_samples(data, "test")
    for good in data.glob("*/test/good"):
        shutil.rmtree(good)
    assert main(["evaluate", str(run), "--data", str(data), "--quiet"]) == 2
    assert "hold no normal image (test/good)" in _one_line_error(capsys)
