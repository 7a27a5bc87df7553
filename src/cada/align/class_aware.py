"""Class-aware alignment (paper Sec. 3.2), the references CADA is compared with.

Per training class c: u_c = mean of its normal pixel scores, gamma_c = mean over its images of each image's
max pixel score. CaDA-A looks the class up by the true class name (labels at training and test: an upper
bound, not usable on anonymous images). CaDA-B predicts the class with a classifier of the regressor's
structure trained with cross-entropy (labels at training only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cada.align.base import Aligner, make_head, train_head
from cada.engine import Trainer
from cada.lookalike import MAX, MEAN, zscore_alignment
from cada.registry import ALIGNERS


@ALIGNERS.register("class-aware")
class ClassAware(Aligner):
    """CaDA-A: (u_c, gamma_c) of the image's given class."""

    needs_class_names = True

    def __init__(self, channels: int, settings):
        super().__init__()
        self.channels, self.settings = channels, settings
        self.class_names: list[str] = []
        self.register_buffer("class_u", torch.zeros(0))
        self.register_buffer("class_gamma", torch.zeros(0))

    def _set_classes(self, class_names: list[str]) -> None:
        """Per-class state sized for `class_names`, on the aligner's device."""
        self.class_names = list(class_names)
        self.class_u = torch.zeros(len(class_names), device=self.device)
        self.class_gamma = torch.zeros(len(class_names), device=self.device)

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        if class_names is None:
            raise ValueError(f"{self.name} alignment needs the class name of every training image")
        self._set_classes(sorted(set(class_names)))
        labels = torch.tensor([self.class_names.index(name) for name in class_names], device=image_stats.device)
        for index in range(len(self.class_names)):
            # Equal-sized maps, so the mean of image means is the mean over all normal pixels.
            self.class_u[index] = image_stats[labels == index, MEAN].mean()
            self.class_gamma[index] = image_stats[labels == index, MAX].mean()
        self.set_min_spread(image_stats)
        return self._fit_classifier(features, labels, settings, generator, trainer or Trainer(progress=progress))

    def _fit_classifier(self, features, labels, settings, generator, trainer) -> list[float]:
        return []

    def class_indices(self, features, class_names) -> torch.Tensor:
        if class_names is None:
            raise ValueError(
                "class-aware alignment (CaDA-A) needs the class name of each test image: it is an upper-bound "
                "reference. For anonymous images use --align cada."
            )
        unknown = sorted(set(class_names) - set(self.class_names))
        if unknown:
            raise ValueError(f"classes {unknown} were not seen in training; CaDA-A knows {self.class_names}")
        return torch.tensor([self.class_names.index(name) for name in class_names], device=features.device)

    def stats(self, features, class_names=None):
        index = self.class_indices(features, class_names)
        return self.class_u[index], self.class_gamma[index]

    def config_state(self) -> dict:
        return {"class_names": self.class_names}

    def load_config_state(self, state: dict) -> None:
        self._set_classes(state["class_names"])


@ALIGNERS.register("classifier", trained=True)
class ClassifierAligner(ClassAware):
    """CaDA-B: a classifier picks the class, whose (u_c, gamma_c) then align the map."""

    needs_class_names = False

    def _set_classes(self, class_names):
        super()._set_classes(class_names)
        self.head = make_head(self.channels, len(class_names), self.settings).to(self.device)

    def _fit_classifier(self, features, labels, settings, generator, trainer) -> list[float]:
        def loss_of(outputs, batch):  # the paper's Eq. 2
            return F.cross_entropy(outputs, labels[batch])

        return train_head(self.head, features, loss_of, settings, generator, "class classifier", trainer)

    def class_indices(self, features, class_names=None):
        return self.head(features).argmax(dim=1)  # an unseen class still maps to its nearest known class


def class_score_statistics(scores: torch.Tensor, class_names: list[str]) -> dict[str, dict]:
    """{class: {"mean", "std", "n"}} of the normal training image scores of each class: the statistics of the
    class-aware oracle (a z-score of the image score within its product), stored in the run at fit time."""
    statistics = {}
    for name in sorted(set(class_names)):
        values = scores[torch.tensor([n == name for n in class_names])].double()
        std = float(values.std()) if len(values) > 1 else 0.0
        statistics[name] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return statistics


def oracle_alignment(statistics: dict[str, dict], class_names) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(u, gamma) per image of the class-aware oracle (`zscore_alignment` of its class's statistics), or None when
    an image's class has no statistics (e.g. a product the run was not trained on)."""
    if not statistics or any(name not in statistics for name in class_names):
        return None
    mean = torch.tensor([statistics[name]["mean"] for name in class_names], dtype=torch.float32)
    std = torch.tensor([statistics[name]["std"] for name in class_names], dtype=torch.float32)
    return zscore_alignment(mean, std)
