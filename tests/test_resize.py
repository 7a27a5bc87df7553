"""The one resize rule (cada.data.resize): Pillow one axis at a time, and the same passes as tensor operations."""

import numpy as np
import pytest
import torch
from PIL import Image

from cada.data.resize import resize_rgb, resize_uint8


@pytest.mark.parametrize(
    "height, width",
    [(256, 256), (300, 400), (1000, 700), (257, 255), (602, 378), (97, 3000), (5, 2), (64, 1), (255, 1024)],
)
def test_tensor_resize_equals_pillow_one_axis_at_a_time(height, width):
    """Shrinking, enlarging, both at once and extreme aspect ratios: every pixel equal, not just close."""
    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = resize_rgb(rgb, 256)
    assert expected.shape == (3, 256, 256) and expected.dtype == torch.uint8
    assert torch.equal(resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), 256), expected)


def test_one_axis_at_a_time_is_pillows_own_resize_when_one_side_already_fits():
    """The images of realmix all have one side at the model size: there the rule is Pillow's plain resize."""
    for shape in ((256, 341, 3), (419, 256, 3)):
        rgb = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        plain = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.BILINEAR))
        assert np.array_equal(resize_rgb(rgb, 256).permute(1, 2, 0).numpy(), plain)
