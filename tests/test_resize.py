"""The one resize rule (cada.data.resize): Pillow one axis at a time, and the same passes as tensor operations."""

import numpy as np
import pytest
import torch
from PIL import Image

from cada.data.resize import PAD_RGB, content_box, crop_to_content, resize_rgb, resize_uint8


@pytest.mark.parametrize(
    "height, width",
    [(256, 256), (300, 400), (1000, 700), (257, 255), (602, 378), (97, 3000), (5, 2), (64, 1), (255, 1024)],
)
@pytest.mark.parametrize("mode", ["squash", "letterbox"])
def test_tensor_resize_equals_pillow_one_axis_at_a_time(height, width, mode):
    """Shrinking, enlarging, both at once and extreme aspect ratios, squashed and letterboxed: every pixel equal,
    not just close."""
    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = resize_rgb(rgb, 256, mode)
    assert expected.shape == (3, 256, 256) and expected.dtype == torch.uint8
    assert torch.equal(resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), 256, mode), expected)


def test_letterbox_keeps_the_aspect_ratio_on_the_mean_colour():
    """A 96 x 64 image at 64 px: 64 x 43 (42.67 rounded), 10 rows of pad colour above and 11 below; the image part
    is the squash rule's resize to 64 x 43."""
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert content_box(96, 64, 64, "letterbox") == (0, 10, 64, 43)
    assert content_box(64, 96, 64, "letterbox") == (10, 0, 43, 64)
    assert content_box(96, 64, 64, "squash") == (0, 0, 64, 64)
    boxed = resize_rgb(rgb, 64, "letterbox")
    pad = torch.tensor(PAD_RGB, dtype=torch.uint8).view(3, 1, 1)
    assert (boxed[:, :10] == pad).all() and (boxed[:, 53:] == pad).all()
    narrower = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BILINEAR))  # width pass alone
    expected = np.asarray(Image.fromarray(narrower).resize((64, 43), Image.Resampling.BILINEAR))
    assert np.array_equal(boxed[:, 10:53].permute(1, 2, 0).numpy(), expected)
    maps = torch.arange(64.0 * 64).view(64, 64)
    assert torch.equal(crop_to_content(maps, 96, 64, "letterbox"), maps[10:53])
    assert torch.equal(crop_to_content(maps, 96, 64, "squash"), maps)


def test_a_letterboxed_mask_lies_where_its_image_does(tmp_path):
    from cada.data.dataset import load_mask

    mask = np.zeros((64, 96), np.uint8)
    mask[:, 90:] = 255  # the right edge
    Image.fromarray(mask).save(tmp_path / "mask.png")
    placed = load_mask(tmp_path / "mask.png", 64, (96, 64), "letterbox")
    assert not placed[:10].any() and not placed[53:].any()  # the padding is normal
    assert placed[10:53, 60:].all() and not placed[10:53, :58].any()


def test_one_axis_at_a_time_is_pillows_own_resize_when_one_side_already_fits():
    """The images of realmix all have one side at the model size: there the rule is Pillow's plain resize."""
    for shape in ((256, 341, 3), (419, 256, 3)):
        rgb = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        plain = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.BILINEAR))
        assert np.array_equal(resize_rgb(rgb, 256).permute(1, 2, 0).numpy(), plain)
