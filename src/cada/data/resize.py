"""The one resize every image gets before the model, the same in training, prediction and the exported graph.

The rule: Pillow's bilinear (triangle) filter, widened by the scale factor when shrinking (antialiased), one axis
at a time, the horizontal pass first, each pass rounded to 8 bits as Pillow does (22-bit fixed-point
coefficients, round half up, clipped to 0-255). `resize_rgb` has Pillow do it, one axis per call; `resize_uint8`
computes the same passes with tensor operations, so that the raw-image ONNX graph (`cada export --input raw`)
resizes exactly as training did: equal to the last bit, for any image size.

One axis per Pillow call, because Pillow 13 does the vertical pass of a two-axis resize first for some shapes
(some images taller than wide), which moves some pixels by one grey level: the rule would then depend on the
installed Pillow. (The images of realmix and realmix-extra resize identically either way: they all have one side
of 256 pixels.)

Two ways to fit an image into the model's S x S input (`Settings.resize`, recorded in the run):
- squash (the default): each axis resized to S, whatever the aspect ratio;
- letterbox: the aspect ratio kept: the long side resized to S, the short one to round(short x S / long) (half up),
  by the same rule, and the image centred (offsets rounded down) on an S x S canvas of the ImageNet mean colour,
  which the encoders' normalisation maps to about zero. `content_box` says where the image lies on the canvas, so
  that maps are cropped to it before they are upsampled to the image's own size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cada.config import RESIZE_MODES

PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)
PAD_RGB = (124, 116, 104)  # the ImageNet mean colour, 0.485/0.456/0.406 x 255 rounded


def content_box(width: int, height: int, size: int, mode: str = "squash") -> tuple[int, int, int, int]:
    """(left, top, content width, content height) of a width x height image on the size x size model input."""
    if mode == "squash":
        return 0, 0, size, size
    if mode != "letterbox":
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    long = _max(width, height)
    fitted_width = _max(1, (2 * width * size + long) // (2 * long))  # round half up, in integers
    fitted_height = _max(1, (2 * height * size + long) // (2 * long))
    return (size - fitted_width) // 2, (size - fitted_height) // 2, fitted_width, fitted_height


def _max(a, b):
    """max of two sizes: plain ints, or an exported graph's symbolic sizes (see resize_uint8)."""
    return torch.sym_max(a, b)


def resize_rgb(rgb: np.ndarray, size: int, mode: str = "squash") -> torch.Tensor:
    """RGB uint8 H x W x 3 -> uint8 tensor 3 x size x size, by the rule above (Pillow, one axis at a time)."""
    left, top, width, height = content_box(rgb.shape[1], rgb.shape[0], size, mode)
    image = Image.fromarray(rgb)
    if image.width != width:
        image = image.resize((width, image.height), Image.Resampling.BILINEAR)
    if image.height != height:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    resized = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if (width, height) == (size, size):
        return resized.contiguous()
    canvas = torch.tensor(PAD_RGB, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    canvas[:, top : top + height, left : left + width] = resized
    return canvas


def crop_to_content(maps: torch.Tensor, width: int, height: int, mode: str = "squash") -> torch.Tensor:
    """... x S x S maps -> the part that covers a width x height image (all of it when squashed)."""
    left, top, fitted_width, fitted_height = content_box(width, height, maps.shape[-1], mode)
    return maps[..., top : top + fitted_height, left : left + fitted_width]


def resize_uint8(images: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """uint8 ... x 3 x H x W -> uint8 ... x 3 x size x size, by the rule above with tensor operations (exportable
    to ONNX with dynamic H and W). Integer arithmetic throughout: equal to `resize_rgb` to the last bit."""
    left, top, width, height = content_box(images.shape[-1], images.shape[-2], size, mode)
    x = images.to(torch.int32)
    x = _resample(x, -1, width)
    x = _resample(x, -2, height)
    if mode == "squash":
        return x.to(torch.uint8)
    # The letterbox: zeros around the image, then the pad colour where the zeros were (pads may be symbolic).
    pads = (left, size - width - left, top, size - height - top)
    outside = 1 - F.pad(torch.ones(height, width, dtype=torch.int32), pads)
    colour = torch.tensor(PAD_RGB, dtype=torch.int32).view(3, 1, 1)
    return (F.pad(x, pads) + outside * colour).to(torch.uint8)


def _coefficients(in_size, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source indices, fixed-point weights), each out_size x taps, of Pillow's bilinear filter along one axis
    (Pillow's precompute_coeffs and normalize_coeffs_8bpc). Taps past a pixel's window get weight 0."""
    # float64 tensors, not Python floats: in an exported graph with symbolic sizes a Python division becomes float32
    scale = torch.ones((), dtype=torch.float64) * in_size / out_size
    width = scale.clamp(min=1.0)  # the filter's half-width in source pixels: widened when shrinking
    taps = max((in_size + out_size - 1) // out_size, 1) * 2 + 1  # Pillow's ceil(support) * 2 + 1
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = (centre - width + 0.5).floor().clamp(min=0)
    end = (centre + width + 0.5).floor().clamp(max=in_size)
    position = first[:, None] + torch.arange(taps, dtype=torch.float64)
    weight = (1 - ((position - centre[:, None] + 0.5) / width).abs()).clamp(min=0)
    weight = torch.where(position < end[:, None], weight, torch.zeros_like(weight))
    weight = weight / weight.sum(dim=1, keepdim=True)
    fixed = (weight * (1 << PRECISION_BITS) + 0.5).floor().to(torch.int32)
    index = (first.long()[:, None] + torch.arange(taps)).clamp(max=in_size - 1)
    return index, fixed


def _resample(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One pass along `dim` (-1: horizontal, -2: vertical) of int32 pixels; int32 holds the sums (at most
    255 x 2^22 x a few)."""
    index, fixed = _coefficients(x.shape[dim], out_size)
    taps = index.shape[1]
    if dim == -1:
        picked = x[..., index.flatten()].unflatten(-1, (out_size, taps))  # ... x H x out x taps
        total = (picked * fixed).sum(dim=-1)
    else:
        picked = x[..., index.flatten(), :].unflatten(-2, (out_size, taps))  # ... x out x taps x W
        total = (picked * fixed[:, :, None]).sum(dim=-2)
    return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255)
