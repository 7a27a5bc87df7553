"""Non-parametric alignment: the k training images that look most like this one give its normal statistics.

Each image is summarised by a global descriptor (its align features averaged over space, centred on the
training mean and L2-normalised). The image scores of its k nearest training images give a normal (mean, std),
and the image score is aligned to 1 + (score - mean) / (3 std) (`zscore_alignment`): when the neighbours are
images of the same product, this is the per-product z-score that knowing the product would give.

The distance to the nearest training image is a free "unfamiliar product" signal. `reference_distance` is the
99th percentile of the training images' leave-one-out nearest distances; an image is unfamiliar beyond
UNFAMILIAR_MARGIN times that (`unfamiliar_reference`). The margin is measured, not a convention: the anomalous
images of trained products lie near the reference (realmix: 32% beyond it, 0.2% beyond twice it; realmix-extra
42% and 0%), every image of a product never trained on 2.4-6.8 times beyond it (README, benchmarks/unfamiliar.py).

`knn-distance` (the default) also scores that distance: an image farther from its nearest training image than its
neighbours are from theirs is unusual as a whole, which the map's top pixels can miss (uneven lighting, a part
that looks wrong everywhere). The distance, z-scored against the neighbours' own leave-one-out nearest distances,
times `distance_weight` is added to the aligned image score (`score_offset`), not to the map: a property of the
whole image has no place in it (README: measured on realmix, realmix-extra and their 6-product mix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cada.align.base import MEAN, SCORE, ZSCORE_WIDTH, Aligner, zscore_alignment
from cada.neighbours import nearest_neighbours
from cada.registry import ALIGNERS

REFERENCE_QUANTILE = 0.99  # of the leave-one-out nearest distances in training: the "familiar" level
UNFAMILIAR_MARGIN = 2.0  # x the reference: between trained products' anomalies and other products (docstring)


@ALIGNERS.register("knn")
class KNNAligner(Aligner):
    centre: torch.Tensor
    train_descriptors: torch.Tensor
    train_scores: torch.Tensor
    train_map_means: torch.Tensor
    reference_distance: torch.Tensor

    def __init__(self, channels: int, settings):
        super().__init__()
        self.neighbours = settings.neighbours
        self._allocate(0, channels)

    def _allocate(self, n_train: int, channels: int) -> None:
        """Buffers sized for `n_train` training images (their shape is known before the weights are loaded), on
        the aligner's device."""
        device = self.device
        self.register_buffer("centre", torch.zeros(channels, device=device))
        self.register_buffer("train_descriptors", torch.zeros(n_train, channels, device=device))
        self.register_buffer("train_scores", torch.zeros(n_train, device=device))
        self.register_buffer("train_map_means", torch.zeros(n_train, device=device))
        self.register_buffer("reference_distance", torch.tensor(float("inf"), device=device))

    def descriptor(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x C: averaged over space, centred on the training mean, unit length."""
        return F.normalize(features.float().mean(dim=(2, 3)) - self.centre, dim=1)

    def neighbours_of(self, descriptors: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances B x k, indices B x k) of the k nearest training images (Euclidean between unit descriptors)."""
        k = min(self.neighbours, len(self.train_descriptors) - int(exclude_self))
        rows = torch.arange(len(descriptors), device=descriptors.device)
        exclude = (rows, rows) if exclude_self else None  # leave-one-out over the training set itself
        return nearest_neighbours(descriptors, self.train_descriptors, k, exclude=exclude)

    def normal_statistics(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the image scores of the training images at `indices` (B x k)."""
        scores = self.train_scores[indices]
        std = scores.std(dim=1) if scores.shape[1] > 1 else torch.zeros_like(scores[:, 0])
        return scores.mean(dim=1), std

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        if len(features) < 2:
            raise ValueError("the knn aligner needs at least two training images")
        self.neighbours = settings.neighbours
        self._allocate(len(features), features.shape[1])
        self.centre.copy_(features.float().mean(dim=(0, 2, 3)))
        self.train_descriptors.copy_(self.descriptor(features))
        self.train_scores.copy_(image_stats[:, SCORE])
        self.train_map_means.copy_(image_stats[:, MEAN])
        distances, indices = self.neighbours_of(self.train_descriptors, exclude_self=True)
        self.reference_distance.fill_(float(distances[:, 0].quantile(REFERENCE_QUANTILE)))
        # A neighbourhood of near-identical scores must not blow a tiny difference up: the spread is kept above
        # a tenth of the typical leave-one-out spread of the training images.
        _, std = self.normal_statistics(indices)
        self.min_spread.fill_(max(0.1 * ZSCORE_WIDTH * float(std.median()), 1e-6))
        return []

    def stats(self, features, class_names=None):
        _, indices = self.neighbours_of(self.descriptor(features))
        return zscore_alignment(*self.normal_statistics(indices))

    def nearest_distance(self, features: torch.Tensor) -> torch.Tensor:
        distances, _ = self.neighbours_of(self.descriptor(features))
        return distances[:, 0]

    @property
    def unfamiliar_reference(self) -> float:
        return UNFAMILIAR_MARGIN * float(self.reference_distance)

    def config_state(self) -> dict:
        return {"n_train": len(self.train_descriptors), "neighbours": self.neighbours}

    def load_config_state(self, state: dict) -> None:
        self.neighbours = state["neighbours"]
        self._allocate(state["n_train"], len(self.centre))


@ALIGNERS.register("knn-distance")
class KNNDistance(KNNAligner):
    """`knn`, and an image score offset of `distance_weight` x the z-score of the distance to the nearest training
    image (module docstring); the aligned maps are knn's."""

    has_score_offset = True
    train_nearest: torch.Tensor
    min_distance_spread: torch.Tensor

    def __init__(self, channels: int, settings):
        super().__init__(channels, settings)
        self.distance_weight = settings.distance_weight

    def _allocate(self, n_train: int, channels: int) -> None:
        super()._allocate(n_train, channels)
        self.register_buffer("train_nearest", torch.zeros(n_train, device=self.device))
        self.register_buffer("min_distance_spread", torch.tensor(1e-6, device=self.device))

    def fit(self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None):
        super().fit(features, image_stats, settings, generator, class_names, progress, trainer)
        self.distance_weight = settings.distance_weight
        _, indices = self.neighbours_of(self.train_descriptors, exclude_self=True)
        self.train_nearest.copy_(self.nearest_exactly(self.train_descriptors, indices))
        # as min_spread: neighbours at near-identical distances must not blow a tiny difference up
        self.min_distance_spread.fill_(max(0.1 * float(self.train_nearest.std()), 1e-6))
        return []

    def nearest_exactly(self, descriptors: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """B distances to the nearest neighbour (the first of `indices`), from the difference itself: the search's
        |q|^2 + |t|^2 - 2 q.t cancels for near-identical descriptors, and its square root magnifies the rounding
        (a training image given again came out 3e-4 from itself, differently in ONNX)."""
        return (descriptors - self.train_descriptors[indices[:, 0]]).norm(dim=1)

    def score_offset(self, features: torch.Tensor) -> torch.Tensor:
        """distance_weight x (nearest distance - the neighbours' mean) / (ZSCORE_WIDTH x their std): on the aligned
        score's own scale, where one normal standard deviation is 1 / ZSCORE_WIDTH."""
        descriptors = self.descriptor(features)
        _, indices = self.neighbours_of(descriptors)
        usual = self.train_nearest[indices]
        spread = usual.std(dim=1).clamp(min=self.min_distance_spread)
        return (
            self.distance_weight
            * (self.nearest_exactly(descriptors, indices) - usual.mean(dim=1))
            / (ZSCORE_WIDTH * spread)
        )

    def config_state(self) -> dict:
        return {**super().config_state(), "distance_weight": self.distance_weight}

    def load_config_state(self, state: dict) -> None:
        super().load_config_state(state)
        self.distance_weight = state["distance_weight"]


@ALIGNERS.register("knn-level")
class KNNLevel(KNNAligner):
    """The k nearest training images give u = their mean raw-map mean and gamma = their mean image score: the
    typical normal image scores 1, as with `knn`, but the scale is the level above the map's floor, not the spread
    of the scores (the issue's second-best oracle, (map mean, mean image score))."""

    def stats(self, features, class_names=None):
        _, indices = self.neighbours_of(self.descriptor(features))
        return self.train_map_means[indices].mean(dim=1), self.train_scores[indices].mean(dim=1)
