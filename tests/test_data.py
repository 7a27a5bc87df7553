"""The MVTec reader and image/mask loading on awkward real-world files."""

import numpy as np
import pytest
import torch
from PIL import Image

from cada.data.dataset import BadImageError, iterate_batches, load_image, load_mask
from cada.data.mvtec import mvtec_samples


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _tree(root):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(3):
            _png(root / name / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        _png(root / name / "test" / "good" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        _png(root / name / "test" / "crack" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10:20] = 255
        _png(root / name / "ground_truth" / "crack" / "000_mask.png", mask)
    return root


def test_mvtec_reader_yields_labels_masks_and_classes(tmp_path):
    root = _tree(tmp_path)
    train = mvtec_samples(root, "train")
    test = mvtec_samples(root, "test")
    assert [s.class_name for s in train] == ["a"] * 3 + ["b"] * 3
    assert all(s.label == 0 and s.mask_path is None for s in train)
    anomalous = [s for s in test if s.label == 1]
    assert len(test) == 4 and len(anomalous) == 2
    assert all(s.defect == "crack" and s.mask_path.name == "000_mask.png" for s in anomalous)


def test_missing_folder_and_class_without_training_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mvtec_samples(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="no MVTec AD class folders"):
        mvtec_samples(tmp_path, "train")
    root = _tree(tmp_path / "data")
    for image in (root / "b" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match="class 'b' has no training images"):
        mvtec_samples(root, "train")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_grey_alpha_palette_and_16bit_images_become_rgb(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    if mode == "RGBA":
        image = Image.fromarray(np.stack([ramp, ramp, ramp, np.full_like(ramp, 128)], axis=2), "RGBA")
    elif mode == "P":
        image = Image.fromarray(np.stack([ramp] * 3, axis=2)).convert("P")
    elif mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 257)  # full 16-bit range
    else:
        image = Image.fromarray(ramp, "L")
    path = tmp_path / f"image_{mode.replace(';', '')}.png"
    image.save(path)
    tensor, size = load_image(path, 64)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8 and size == (32, 32)
    # The ramp survives: dark on the left, bright on the right, in every channel.
    assert tensor[:, :, :4].float().mean() < 40 and tensor[:, :, -4:].float().mean() > 200


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif)
    _, size = load_image(path, 32)
    assert size == (20, 40)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="garbage.png"):
        load_image(garbage, 32)
    full = _png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(BadImageError, match="truncated.png"):
        load_image(truncated, 32)


def test_masks_are_binarised_and_resized_with_their_image(tmp_path):
    mask = np.zeros((80, 80), np.uint8)
    mask[:40] = 1  # not 0/255: any non-zero pixel is anomalous
    path = _png(tmp_path / "m.png", mask)
    loaded = load_mask(path, 32, image_size=(40, 40))  # half the resolution, same aspect: resized
    assert loaded.dtype == torch.bool and loaded[:16].all() and not loaded[16:].any()
    with pytest.raises(BadImageError, match="aspect ratios differ"):
        load_mask(path, 32, image_size=(40, 80))


def test_a_bad_file_in_a_batch_is_reported_and_skipped(tmp_path):
    root = _tree(tmp_path)
    (root / "a" / "test" / "good" / "000.png").write_bytes(b"broken")
    samples = mvtec_samples(root, "test")
    with pytest.warns(UserWarning, match="skipped: cannot read image .*000.png"):
        batches = list(iterate_batches(samples, 32, batch_size=8, workers=0))
    assert sum(len(b["index"]) for b in batches) == len(samples) - 1
    with pytest.raises(BadImageError):
        list(iterate_batches(samples, 32, batch_size=8, workers=0, strict=True))


def test_non_ascii_and_spaces_in_names(tmp_path):
    path = _png(tmp_path / "prüf bild 1.png", np.zeros((16, 16, 3), np.uint8))
    tensor, _ = load_image(path, 32)
    assert tensor.shape == (3, 32, 32)


def test_image_size_of_follows_exif_rotation_like_read_image(tmp_path):
    from PIL import Image

    from cada.data.dataset import image_size_of, read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap
    Image.new("RGB", (40, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")
    assert image_size_of(tmp_path / "rotated.jpg") == read_image(tmp_path / "rotated.jpg").size == (20, 40)
    assert image_size_of(tmp_path / "plain.png") == (40, 20)
