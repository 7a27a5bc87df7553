"""Class-Agnostic Distribution Alignment (paper Sec. 3.3): a regressor predicts (u, gamma) from an image.

Targets per normal training image are statistics of its raw map from the trained, frozen base method:
(mean, max) for CADA (u, gamma), (mean, std) for the (u, sigma) variant with gamma = u + 3 sigma (Table 5).
Dropout before the linear layers is the paper's noise: it stands in for anomalies so that the regressor
predicts the statistics of the image's *normal* class even on anomalous images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cada.align.base import Aligner, make_head, train_head
from cada.engine import Trainer
from cada.lookalike import MAX, MEAN, SCORE, STD
from cada.registry import ALIGNERS


@ALIGNERS.register("cada", trained=True)
class CADA(Aligner):
    targets = (MEAN, MAX)

    def __init__(self, channels: int, settings):
        super().__init__()
        self.head = make_head(channels, 2, settings)

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        self.set_min_spread(image_stats)
        targets = image_stats[:, list(self.targets)]
        with torch.no_grad():  # start from the mean statistics so SGD does not spend its first steps getting there
            self.head.output_layer.bias.copy_(targets.mean(dim=0))

        def loss_of(outputs, batch):  # the paper's Eq. 3-4: smooth-L1 with threshold alpha, summed over (u, gamma)
            loss = F.smooth_l1_loss(outputs, targets[batch], beta=settings.smooth_l1_alpha, reduction="none")
            return loss.sum(dim=1).mean()

        return train_head(
            self.head,
            features,
            loss_of,
            settings,
            generator,
            f"{self.name} regressor",
            trainer or Trainer(progress=progress),
        )

    def stats(self, features, class_names=None):
        u, second = self.head(features).unbind(dim=1)
        return u, self.gamma(u, second)

    def gamma(self, u: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return second


@ALIGNERS.register("cada-sigma", trained=True)
class CADASigma(CADA):
    """The (u, sigma) variant: regress mean and standard deviation, gamma = u + 3 sigma."""

    targets = (MEAN, STD)

    def gamma(self, u, second):
        return u + 3 * second


@ALIGNERS.register("cada-score", trained=True)
class CADAScore(CADA):
    """Not in the paper: gamma's target is the image score (top fraction of the smoothed map, the value the
    threshold sees) instead of the raw map's max, so every product's typical normal image scores 1 after
    alignment, however spiky its maps are (with the max, the aligned normal score is top / max, per product)."""

    targets = (MEAN, SCORE)
