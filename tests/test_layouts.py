"""Every folder layout, auto-detection, the image cache and duplicate checks, on tiny trees made here.

The same images are written in the MVTec AD, VisA and BTAD layouts; each must read back as the same
labelled images and masks, and evaluation on them must give the same numbers.
"""

import csv
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cada.data.dataset as dataset
from cada.config import Settings
from cada.data import (
    BadImageError,
    Sample,
    detect_format,
    find_duplicates,
    find_samples,
    folder_samples,
    image_files,
    iterate_batches,
    load_all,
    warn_duplicates,
)
from cada.data.cache import ImageCache

from helpers import train_args

SIZE = 32
CLASSES = ("alpha", "beta")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The default cache folder of every test here is a fresh temporary one, never the user's home."""
    monkeypatch.setenv("CADA_CACHE_DIR", str(tmp_path / "default-cache"))


def _encoded(array, format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format)
    return buffer.getvalue()


def _images(seed=0):
    """Per class: 3 train normals, 2 test normals, 2 anomalous images with masks (24 x 32, not square)."""
    rng = np.random.default_rng(seed)
    data = {}
    for name in CLASSES:

        def image():
            return rng.integers(0, 200, (24, 32, 3), dtype=np.uint8)

        anomalous = []
        for stem in ("bad 0", "bäd-1"):  # spaces and non-ASCII names
            pixels, mask = image(), np.zeros((24, 32), np.uint8)
            top, left = rng.integers(0, 12, 2)
            mask[top : top + 8, left : left + 8] = rng.integers(1, 4)  # VisA-style region numbers, not 255
            pixels[mask > 0] = 255
            anomalous.append((stem, pixels, mask))
        data[name] = {
            "train": [(f"tr{i}", image()) for i in range(3)],
            "good": [(f"te{i}", image()) for i in range(2)],
            "bad": anomalous,
        }
    return data


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def write_mvtec(root, data):
    for name, parts in data.items():
        for stem, pixels in parts["train"]:
            _write(root / name / "train" / "good" / f"{stem}.png", _encoded(pixels))
        for stem, pixels in parts["good"]:
            _write(root / name / "test" / "good" / f"{stem}.png", _encoded(pixels))
        for stem, pixels, mask in parts["bad"]:
            _write(root / name / "test" / "crack" / f"{stem}.png", _encoded(pixels))
            binary = (mask > 0).astype(np.uint8) * 255
            _write(root / name / "ground_truth" / "crack" / f"{stem}_mask.png", _encoded(binary))
    return root


def write_visa(root, data, with_split_file=True):
    rows = [("object", "split", "label", "image", "mask")]
    for name, parts in data.items():
        for split, key in (("train", "train"), ("test", "good")):
            for stem, pixels in parts[key]:
                relative = f"{name}/Data/Images/Normal/{stem}.png"
                _write(root / relative, _encoded(pixels))
                rows.append((name, split, "normal", relative, ""))
        for stem, pixels, mask in parts["bad"]:
            image, mask_file = f"{name}/Data/Images/Anomaly/{stem}.png", f"{name}/Data/Masks/Anomaly/{stem}.png"
            _write(root / image, _encoded(pixels))
            _write(root / mask_file, _encoded(mask))  # region numbers as they are
            rows.append((name, "test", "anomaly", image, mask_file))
    if with_split_file:
        (root / "split_csv").mkdir(parents=True)
        with open(root / "split_csv" / "1cls.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return root


def write_btad(root, data):
    for name, parts in data.items():
        for stem, pixels in parts["train"]:
            _write(root / name / "train" / "ok" / f"{stem}.bmp", _encoded(pixels, "BMP"))
        for stem, pixels in parts["good"]:
            _write(root / name / "test" / "ok" / f"{stem}.bmp", _encoded(pixels, "BMP"))
        for stem, pixels, mask in parts["bad"]:
            _write(root / name / "test" / "ko" / f"{stem}.bmp", _encoded(pixels, "BMP"))
            # BTAD pairs .bmp images with .png masks in some classes: matched by stem.
            _write(root / name / "ground_truth" / "ko" / f"{stem}.png", _encoded((mask > 0).astype(np.uint8) * 255))
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    data, base = _images(), tmp_path_factory.mktemp("layouts")
    return {
        "mvtec": write_mvtec(base / "mvtec", data),
        "visa": write_visa(base / "visa", data),
        "btad": write_btad(base / "btad", data),
    }


def _content(samples):
    """(class, label, stem) -> (image, mask, has_mask) as loaded: everything evaluation reads, paths aside."""
    loaded = {}
    for batch in iterate_batches(samples, SIZE, batch_size=64, workers=0, cache_dir=None):
        for row, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            loaded[(sample.class_name, sample.label, sample.path.stem)] = (
                batch["image"][row],
                batch["mask"][row],
                bool(batch["has_mask"][row]),
            )
    return loaded


@pytest.mark.parametrize("layout", ["mvtec", "visa", "btad"])
def test_auto_picks_each_layout_and_reads_it_like_mvtec(trees, layout):
    assert detect_format(trees[layout]) == layout
    reference = {split: _content(find_samples(trees["mvtec"], split)[0]) for split in ("train", "test")}
    for split, count in (("train", 6), ("test", 8)):
        samples, chosen = find_samples(trees[layout], split)
        assert chosen == layout and len(samples) == count
        assert [s.class_name for s in samples] == sorted(s.class_name for s in samples)
        loaded = _content(samples)
        assert loaded.keys() == reference[split].keys()
        for key, (image, mask, has_mask) in loaded.items():
            ref_image, ref_mask, ref_has_mask = reference[split][key]
            assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask) and has_mask == ref_has_mask
        assert all(m.any() for (_, label, _), (_, m, _) in loaded.items() if label == 1)


class _StubDetector:
    """Anomaly map = image brightness; enough to run the real evaluation code on each layout."""

    settings = Settings(image_size=SIZE)
    device = torch.device("cpu")
    aligner = SimpleNamespace(needs_class_names=False)

    def infer(self, images, class_names=None):
        from cada.inference import BatchResult

        maps = images.float().mean(dim=1) / 255
        n = len(images)
        return BatchResult(maps, maps.flatten(1).amax(dim=1), torch.zeros(n), torch.ones(n), torch.zeros(n, 1, 1, 1))


def test_evaluation_numbers_are_the_same_in_every_layout(trees):
    from cada.evaluate import collect, results_table

    results = {}
    for layout, root in trees.items():
        samples, _ = find_samples(root, "test")
        results[layout] = results_table(collect(_StubDetector(), samples, progress=False), "stub", ("none",))
    # Defect types are named by each layout (MVTec's folders, VisA's "anomaly", BTAD's "ko"): same images.
    defect_counts = {}
    for layout, result in results.items():
        for product in result["per_product"]["none"]["products"].values():
            defects = product.pop("defects")
            defect_counts.setdefault(layout, []).append(sum(d["n"] for d in defects.values()))
    assert defect_counts["visa"] == defect_counts["mvtec"] == defect_counts["btad"] and all(defect_counts["mvtec"])
    assert results["visa"] == results["mvtec"] and results["btad"] == results["mvtec"]
    assert results["mvtec"]["rows"][0]["i_auroc"] is not None


def test_a_single_class_folder_is_read_as_that_class(trees):
    for layout in ("mvtec", "visa", "btad"):
        samples, chosen = find_samples(trees[layout] / "beta", "test")
        assert chosen == layout and len(samples) == 4 and {s.class_name for s in samples} == {"beta"}


def test_unrecognised_layout_and_visa_without_split_file_say_what_is_missing(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot tell the layout.*VisA.*BTAD.*MVTec AD"):
        find_samples(tmp_path, "train")
    with pytest.raises(ValueError, match="format must be one of"):
        find_samples(tmp_path, "train", format="coco")
    root = write_visa(tmp_path / "visa", _images(), with_split_file=False)
    assert detect_format(root) == "visa"
    with pytest.raises(FileNotFoundError, match="no split file .*1cls.csv"):
        find_samples(root, "train")


def test_empty_classes_fail_in_training_and_are_skipped_with_a_warning_in_testing(tmp_path):
    data = _images()
    btad = write_btad(tmp_path / "btad", data)
    for image in (btad / "beta" / "test").rglob("*.bmp"):
        image.unlink()
    with pytest.warns(UserWarning, match="class 'beta' has no test images"):
        samples, _ = find_samples(btad, "test")
    assert {s.class_name for s in samples} == {"alpha"}
    for image in (btad / "beta" / "train" / "ok").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match="class 'beta' has no training images"):
        find_samples(btad, "train")
    visa = write_visa(tmp_path / "visa", {"alpha": data["alpha"], "beta": {**data["beta"], "bad": [], "good": []}})
    with pytest.warns(UserWarning, match="class 'beta' has no test images"):
        find_samples(visa, "test")
    visa = write_visa(tmp_path / "visa2", {"alpha": data["alpha"], "beta": {**data["beta"], "train": []}})
    with pytest.raises(ValueError, match="class 'beta' has no training images"):
        find_samples(visa, "train")


def test_folder_layout_matches_masks_by_stem(tmp_path):
    rng = np.random.default_rng(1)
    picture = lambda: _encoded(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    mask = _encoded(np.full((16, 16), 255, np.uint8))
    for name in ("a.png", "b.jpg.png"):
        _write(tmp_path / "normal" / name, picture())
    for name in ("x 1.png", "y.png", "z.png"):
        _write(tmp_path / "scratch" / name, picture())
    _write(tmp_path / "masks" / "x 1_mask.png", mask)  # with the suffix
    _write(tmp_path / "masks" / "y.png", mask)  # without it; z has none
    samples = folder_samples(normal=[tmp_path / "normal"], anomalous=[tmp_path / "scratch"], masks=[tmp_path / "masks"])
    assert [(s.label, s.class_name) for s in samples] == [(0, "folder")] * 2 + [(1, "folder")] * 3
    assert [s.mask_path.name if s.mask_path else None for s in samples[2:]] == ["x 1_mask.png", "y.png", None]
    assert samples[2].defect == "scratch"
    # The training root of the folder format: every image below it, one class.
    train, chosen = find_samples(tmp_path / "normal", "train", format="folder")
    assert chosen == "folder" and [s.path.name for s in train] == ["a.png", "b.jpg.png"]
    with pytest.raises(ValueError, match="anomalous"):
        find_samples(tmp_path / "normal", "test", format="folder")


def test_image_files_are_found_recursively_sorted_and_images_only(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "a/deep/0.bmp", "a/notes.txt", "a/.hidden.png", ".git/x.png"):
        _write(tmp_path / name, b"")
    found = image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.jpg", "a/deep/0.bmp", "b/2.PNG"]
    assert image_files([tmp_path / "b" / "2.PNG", tmp_path / "b"]) == [tmp_path / "b" / "2.PNG"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_files(tmp_path / "empty")


def test_same_image_in_train_and_test_warns(trees, tmp_path):
    train, _ = find_samples(trees["mvtec"], "train")
    test, _ = find_samples(trees["mvtec"], "test")
    assert find_duplicates(train, test) == []
    copy = tmp_path / "copy.png"
    copy.write_bytes(train[1].path.read_bytes())
    test = test + [Sample(copy, 0, "alpha")]
    with pytest.warns(UserWarning, match="1 test image.* identical to training images.*copy.png"):
        assert warn_duplicates(train, test) == [(train[1].path, copy)]


def _count_decodes(monkeypatch):
    calls = []
    original = dataset.read_image
    monkeypatch.setattr(dataset, "read_image", lambda path, *rest: calls.append(path) or original(path, *rest))
    return calls


def test_cache_returns_the_same_tensors_without_decoding(trees, tmp_path, monkeypatch):
    samples, _ = find_samples(trees["visa"], "test")
    calls = _count_decodes(monkeypatch)
    cold = list(iterate_batches(samples, SIZE, batch_size=64, workers=0, cache_dir=tmp_path / "c"))
    assert len(calls) == len(samples) + 4  # every image and the four masks
    calls.clear()
    warm = list(iterate_batches(samples, SIZE, batch_size=64, workers=0, cache_dir=tmp_path / "c"))
    assert calls == []
    for key in ("image", "mask", "has_mask", "index"):
        assert torch.equal(cold[0][key], warm[0][key])
    # Another size is another entry; no cache decodes every time.
    load_all(samples, SIZE // 2, cache_dir=tmp_path / "c", workers=0)
    load_all(samples, SIZE, cache_dir=None, workers=0)
    assert len(calls) == 2 * (len(samples) + 4)
    # The default folder comes from $CADA_CACHE_DIR.
    load_all(samples[:1], SIZE, workers=0)
    assert list((tmp_path / "default-cache").rglob("*.npy"))


def test_corrupt_cache_entries_are_decoded_again_and_edited_files_miss(tmp_path, monkeypatch):
    image = tmp_path / "img.png"
    image.write_bytes(_encoded(np.full((8, 8, 3), 7, np.uint8)))
    samples = [Sample(image, 0, "a")]
    reference, _ = load_all(samples, SIZE, cache_dir=tmp_path / "c", workers=0)
    entries = list((tmp_path / "c").rglob("*.npy"))
    assert len(entries) == 1
    calls = _count_decodes(monkeypatch)
    for damage in (entries[0].read_bytes()[:100], b"garbage", np.lib.format.magic(1, 0) + b"\0" * 50):
        entries[0].write_bytes(damage)
        again, _ = load_all(samples, SIZE, cache_dir=tmp_path / "c", workers=0)
        assert torch.equal(again, reference)
    assert len(calls) == 3
    np.save(entries[0], np.zeros((2, 2), np.float32))  # a valid file of the wrong kind
    assert torch.equal(load_all(samples, SIZE, cache_dir=tmp_path / "c", workers=0)[0], reference) and len(calls) == 4
    image.write_bytes(_encoded(np.full((8, 8, 3), 9, np.uint8)))  # new content: a new key
    edited, _ = load_all(samples, SIZE, cache_dir=tmp_path / "c", workers=0)
    assert edited.unique().tolist() == [9] and len(calls) == 5


def test_unwritable_cache_warns_once_and_loading_goes_on(tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    cache = ImageCache(blocker / "sub")
    with pytest.warns(UserWarning, match="cannot be written") as record:
        cache.put("ab" * 20, np.zeros((4, 2, 2), np.uint8))
        cache.put("cd" * 20, np.zeros((4, 2, 2), np.uint8))
    assert len(record) == 1 and cache.get("ab" * 20, (4, 2, 2)) is None


def test_one_bad_file_among_many_is_skipped_with_its_path_and_strict_aborts(trees, tmp_path):
    data = _images()
    root = write_btad(tmp_path / "btad", data)
    broken = root / "alpha" / "train" / "ok" / "tr1.bmp"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    samples, _ = find_samples(root, "train")
    for cache in (None, tmp_path / "c", tmp_path / "c"):  # no cache, cold cache, warm cache
        with pytest.warns(UserWarning, match="skipped: cannot read image .*tr1.bmp"):
            images, kept = load_all(samples, SIZE, cache_dir=cache, workers=0)
        assert len(kept) == len(samples) - 1 and broken not in [s.path for s in kept]
    with pytest.raises(BadImageError, match="tr1.bmp"):
        load_all(samples, SIZE, strict=True, cache_dir=tmp_path / "c", workers=0)


def test_visa_converted_to_the_mvtec_layout_reads_as_mvtec(tmp_path):
    """Converted VisA keeps JPG images and PNG masks of the same stem, without a _mask suffix."""
    rng = np.random.default_rng(2)
    picture = lambda: _encoded(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "JPEG")  # noqa: E731
    _write(tmp_path / "candle" / "train" / "good" / "0000.JPG", picture())
    _write(tmp_path / "candle" / "test" / "good" / "0001.JPG", picture())
    _write(tmp_path / "candle" / "test" / "bad" / "000.JPG", picture())
    _write(tmp_path / "candle" / "ground_truth" / "bad" / "000.png", _encoded(np.ones((16, 16), np.uint8)))
    samples, chosen = find_samples(tmp_path, "test")
    assert chosen == "mvtec" and [s.label for s in samples] == [1, 0]
    assert samples[0].mask_path == tmp_path / "candle" / "ground_truth" / "bad" / "000.png"


def test_cada_evaluate_gives_the_same_numbers_on_every_layout(trees, tmp_path, capsys):
    import json

    from cada.cli import main

    run = tmp_path / "run"
    assert main(train_args(trees["mvtec"], run)) == 0
    rows = {}
    for layout, root in trees.items():
        out = tmp_path / f"{layout}.json"
        assert main(["evaluate", str(run), "--data", str(root), "--json", str(out), "--quiet"]) == 0
        assert f"data layout of {root}: {layout}" in capsys.readouterr().out
        rows[layout] = json.loads(out.read_text())["rows"]
    assert rows["visa"] == rows["mvtec"] and rows["btad"] == rows["mvtec"]
