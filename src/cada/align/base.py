"""What every aligner provides (see DESIGN.md, "Aligner")."""

from __future__ import annotations

import torch
from torch import nn


class Aligner(nn.Module):
    """Predicts per-image normal-score statistics (u, gamma); the aligned map is (M - u) / (gamma - u).

    `min_spread` keeps gamma - u away from zero (and positive, so the alignment never flips the order of
    scores): it is a fraction of the typical spread seen in training, set by `fit`.
    """

    name: str = ""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_spread", torch.tensor(1e-6))

    def fit(self, features: torch.Tensor, targets: torch.Tensor, settings, generator: torch.Generator,
            class_names: list[str] | None = None, progress: bool = True) -> list[float]:
        """features: N x C x h x w of normal training images; targets: N x 2 per-image (mean, max) of the raw map."""
        raise NotImplementedError

    def stats(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, gamma), each of shape B."""
        raise NotImplementedError

    def spread(self, u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return torch.clamp(gamma - u, min=self.min_spread)

    def set_min_spread(self, targets: torch.Tensor, fraction: float = 0.1) -> None:
        typical = (targets[:, 1] - targets[:, 0]).median().clamp(min=1e-6)
        self.min_spread.fill_(float(typical) * fraction)


class NoAlign(Aligner):
    """The base map as it is: u = 0, gamma = 1."""

    name = "none"

    def fit(self, features, targets, settings, generator, class_names=None, progress=True) -> list[float]:
        return []

    def stats(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = features.shape[0]
        return features.new_zeros(batch), features.new_ones(batch)
