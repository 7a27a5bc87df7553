"""Tests for the synthetic MVTec-layout data generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cada.data.synthetic import CLASSES, DEFECTS, add_defect, generate_dataset, render


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _laplacian_energy(rgb: np.ndarray) -> float:
    g = rgb.astype(np.float64).mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    return generate_dataset(root, n_train=3, n_test_good=2, n_test_defect=6, image_size=64)


def test_public_names():
    assert len(CLASSES) >= 4 and len(set(CLASSES)) == len(CLASSES)
    assert set(DEFECTS) >= {"scratch", "spot", "missing", "colour"}


def test_layout_counts_and_masks(small_set: Path):
    assert sorted(d.name for d in small_set.iterdir() if d.is_dir()) == sorted(CLASSES)
    for name in CLASSES:
        folder = small_set / name
        assert len(list((folder / "train" / "good").glob("*.png"))) == 3
        assert len(list((folder / "test" / "good").glob("*.png"))) == 2
        defect_images = [p for d in DEFECTS for p in (folder / "test" / d).glob("*.png")]
        assert len(defect_images) == 6  # round robin: 2, 2, 1, 1 over the four kinds
        assert sorted(len(list((folder / "test" / d).glob("*.png"))) for d in DEFECTS) == [1, 1, 2, 2]
        assert (folder / "train" / "good" / "000.png").is_file()
        for image_path in defect_images:
            mask_path = folder / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            image, mask = _load(image_path), _load(mask_path)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert mask.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}
            assert 30 <= (mask > 0).sum() <= 0.05 * mask.size
        n_masks = len(list((folder / "ground_truth").rglob("*_mask.png")))
        assert n_masks == 6


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, small_set: Path):
    args = dict(classes=["weave", "washer"], n_train=2, n_test_good=1, n_test_defect=2, image_size=64)
    a = _files(generate_dataset(tmp_path / "a", seed=0, **args))
    b = _files(generate_dataset(tmp_path / "b", seed=0, **args))
    c = _files(generate_dataset(tmp_path / "c", seed=1, **args))
    assert a == b and len(a) == 2 * (2 + 1 + 2 + 2)
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "ground_truth" not in k)
    # other classes and counts do not change an image: small_set holds the same files and more
    full = _files(small_set)
    assert all(full[k] == v for k, v in a.items())


def test_regenerate_over_own_output_and_refuse_foreign(tmp_path: Path):
    args = dict(classes=["marble"], n_test_good=1, n_test_defect=1, image_size=64)
    root = generate_dataset(tmp_path / "out", n_train=3, **args)
    # re-generating over our own output is allowed and leaves no stale files behind
    generate_dataset(root, n_train=1, **args)
    assert len(list((root / "marble" / "train" / "good").glob("*.png"))) == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        generate_dataset(foreign, n_train=1, n_test_good=0, n_test_defect=0, image_size=64)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", classes=["nope"])
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "y", n_train=-1)
    with pytest.raises(ValueError):
        add_defect(np.zeros((64, 64, 3), np.uint8), "dent", np.random.default_rng(0))


@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("class_name", CLASSES)
def test_defect_changes_only_inside_mask(class_name: str, kind: str):
    rng = np.random.default_rng(7)
    image = render(class_name, rng, 128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    defective, mask = add_defect(image, kind, rng)
    assert defective.shape == image.shape and defective.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == bool
    assert 30 <= mask.sum() <= 0.05 * mask.size
    diff = np.abs(defective.astype(int) - image.astype(int)).max(axis=2)
    assert diff[~mask].max() == 0  # outside the mask nothing changed
    assert diff[mask].mean() > 15  # inside, the change is clearly visible


def test_defects_on_the_washer_stay_on_the_washer(small_set: Path):
    # the washer ring spans radii 0.13-0.33 of the image size around the (jittered) centre
    for mask_path in (small_set / "washer" / "ground_truth").rglob("*_mask.png"):
        ys, xs = np.nonzero(_load(mask_path) > 0)
        radius = np.hypot(ys - 32, xs - 32) / 64
        assert (radius > 0.08).all() and (radius < 0.38).all()


def test_classes_look_different():
    rng = np.random.default_rng(0)
    energy = {name: np.mean([_laplacian_energy(render(name, rng, 128)) for _ in range(3)]) for name in CLASSES}
    assert energy["weave"] > 4 * energy["marble"]
    assert energy["circuit"] > 2 * energy["marble"]
    means = {name: render(name, rng, 128).reshape(-1, 3).mean(0) for name in CLASSES}
    for i, a in enumerate(CLASSES):
        for b in CLASSES[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 20, (a, b)  # different colours


def test_normal_images_vary_a_little():
    images = [render("washer", np.random.default_rng(s), 64).astype(int) for s in range(3)]
    assert not np.array_equal(images[0], images[1])
    assert np.abs(images[0].mean((0, 1)) - images[1].mean((0, 1))).max() < 10
