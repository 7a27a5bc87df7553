"""What every base method provides (see DESIGN.md, "Base method")."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class MethodOutput(NamedTuple):
    anomaly_map: torch.Tensor  # B x H x W at input resolution, unsmoothed, larger = more anomalous
    align_features: torch.Tensor  # B x C x h x w, what the aligner reads


class BaseMethod(nn.Module):
    """A base anomaly detector. `score_scale` is the smooth-L1 alpha that fits its map's scale."""

    name: str = ""
    score_scale: float = 0.1
    align_channels: int  # channels of `align_features`, so an aligner can be built before training

    def fit(self, images: torch.Tensor, settings, generator: torch.Generator, progress: bool = True) -> list[float]:
        """Train on normal uint8 images (N x 3 x S x S); returns the loss per iteration (empty: no gradient training)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> MethodOutput:
        raise NotImplementedError
