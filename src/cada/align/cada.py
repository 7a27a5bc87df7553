"""Class-Agnostic Distribution Alignment (paper Sec. 3.3): a regressor predicts (u, gamma) from an image.

Targets per normal training image are the mean and the max of its raw map, as given by the trained, frozen
base method. Dropout before the linear layers is the paper's noise: it stands in for anomalies so that the
regressor predicts the statistics of the image's *normal* class even on anomalous images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cada.align.base import Aligner


class StatsHead(nn.Module):
    """1 conv keeping the channel count, global average pooling, dropout, 2 linear layers."""

    def __init__(self, channels: int, outputs: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.mlp = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, outputs)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(features).mean(dim=(2, 3)))


def smooth_l1(prediction: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's Eq. 4 (PyTorch's smooth_l1_loss with beta = alpha), summed over (u, gamma), batch-averaged."""
    return F.smooth_l1_loss(prediction, target, beta=alpha, reduction="none").sum(dim=1).mean()


class CADA(Aligner):
    name = "cada"

    def __init__(self, channels: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.head = StatsHead(channels, 2, hidden, dropout)

    def fit(self, features, targets, settings, generator, class_names=None, progress=True) -> list[float]:
        self.set_min_spread(targets)
        with torch.no_grad():  # start from the mean statistics so SGD does not spend its first steps getting there
            self.head.mlp[-1].bias.copy_(targets.mean(dim=0))
        optimizer = torch.optim.SGD(
            self.head.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        alpha = settings.smooth_l1_alpha
        self.train()
        losses: list[float] = []
        bar = tqdm(range(settings.iters), desc="CADA regressor", disable=not progress, leave=False)
        for _ in bar:
            batch = torch.randint(len(features), (settings.batch_size,), generator=generator)
            loss = smooth_l1(self.head(features[batch]), targets[batch], alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        self.eval()
        return losses

    def stats(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, gamma = self.head(features).unbind(dim=1)
        return u, gamma
