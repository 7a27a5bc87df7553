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
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)


def resize_rgb(rgb: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 H x W x 3 -> uint8 tensor 3 x size x size, by the rule above (Pillow, one axis at a time)."""
    image = Image.fromarray(rgb)
    if image.width != size:
        image = image.resize((size, image.height), Image.Resampling.BILINEAR)
    if image.height != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ... x H x W -> uint8 ... x size x size, by the rule above with tensor operations (exportable to ONNX
    with dynamic H and W). Integer arithmetic throughout: equal to `resize_rgb` to the last bit."""
    x = images.to(torch.int32)
    x = _resample(x, -1, size)
    x = _resample(x, -2, size)
    return x.to(torch.uint8)


def _coefficients(in_size, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source indices, fixed-point weights), each out_size x taps, of Pillow's bilinear filter along one axis
    (Pillow's precompute_coeffs and normalize_coeffs_8bpc). Taps past a pixel's window get weight 0."""
    scale = in_size / out_size
    width = max(scale, 1.0)  # the filter's half-width in source pixels: widened when shrinking
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
