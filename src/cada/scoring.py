"""Map arithmetic shared by evaluation, prediction and export: smoothing, alignment, image score.

Smoothing and alignment are both linear per image (the Gaussian kernel sums to one and reflect padding keeps
constants), so aligning then smoothing equals smoothing then aligning; and a positive affine map keeps the
order of pixels, so the aligned image score is the affine map of the base image score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian with radius 4 sigma (scipy.ndimage's default truncation), summing to one."""
    radius = max(1, int(4 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of B x H x W maps, reflect padding (two 1-D passes, not one 2-D kernel)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps)
    radius = len(kernel) // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def image_score(maps: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Mean of the top `top_fraction` of pixels of each map (at least one pixel)."""
    flat = maps.flatten(1)
    count = max(1, math.ceil(top_fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


def align(values: torch.Tensor, u: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """(values - u) / spread per image; `values` is B or B x H x W, u and spread are B."""
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values - u.view(shape)) / spread.view(shape)


def aligned_scores(
    base_scores: torch.Tensor, u: torch.Tensor, spread: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """(base - u) / spread, plus the aligner's whole-image offset if it has one."""
    scores = align(base_scores, u, spread)
    return scores if offset is None else scores + offset
