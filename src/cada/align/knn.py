"""The non-parametric aligners: the k training images that look most like an image give its normal statistics
(`cada.lookalike`, which says how and why).

`knn-distance` (the default) also scores the distance to the nearest training image: an image farther from it
than its neighbours are from theirs is unusual as a whole, which the map's top pixels can miss (uneven lighting, a
part that looks wrong everywhere). The distance, z-scored against the neighbours' own leave-one-out nearest
distances, times `distance_weight` is added to the aligned image score (`score_offset`), not to the map: a property
of the whole image has no place in it (docs/results/aligners.md: knn-distance against knn).
"""

from __future__ import annotations

import torch

from cada.align.base import Aligner
from cada.lookalike import SPREAD_FLOOR, ZSCORE_WIDTH, LookAlikes, neighbourhood_mean_std
from cada.registry import ALIGNERS


@ALIGNERS.register("knn")
class KNNAligner(LookAlikes, Aligner):
    """The look-alikes' (u, gamma) as an aligner: the aligned image score is 1 + z / 3, z the image score's z-score
    among its k nearest training images (AlignTraining.neighbours)."""

    def __init__(self, channels: int, settings):
        super().__init__(channels, settings.neighbours)

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        self.learn(features, image_stats, settings.neighbours)
        return []

    def stats(self, features, class_names=None, leave_out: torch.Tensor | None = None):
        """(u, gamma); `leave_out`: see neighbours_of (the training images' own statistics, as if unseen)."""
        return self.normal_stats(features, leave_out)


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
        _, indices = self.neighbours_of(self.train_descriptors, self.every_training_image())
        self.train_nearest.copy_(self.nearest_exactly(self.train_descriptors, indices))
        # as min_spread, of the spread of the training images' nearest distances
        self.min_distance_spread.copy_((SPREAD_FLOOR * self.train_nearest.std()).clamp(min=1e-6))
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
        distances, indices = self.neighbours_of(descriptors)
        typical = self.min_distance_spread / SPREAD_FLOOR  # the training images' nearest distances' std
        usual, spread = neighbourhood_mean_std(self.train_nearest[indices], self.same_product(distances), typical)
        return (
            self.distance_weight
            * (self.nearest_exactly(descriptors, indices) - usual)
            / (ZSCORE_WIDTH * spread.clamp(min=self.min_distance_spread))
        )

    def config_state(self) -> dict:
        return {**super().config_state(), "distance_weight": self.distance_weight}

    def load_config_state(self, state: dict) -> None:
        super().load_config_state(state)
        self.distance_weight = state["distance_weight"]


@ALIGNERS.register("distance-only")
class DistanceOnly(KNNDistance):
    """The map as the base gives it (u = 0, gamma = 1), plus `knn-distance`'s whole-image term and unfamiliar
    signal: for a base that aligns its own map per image (revdist-patchcore), which a second alignment by the
    same neighbours only blurred (docs/results/default-method.md)."""

    def stats(self, features, class_names=None, leave_out=None):
        # made from the features, not from len(features), which an exported graph would fix at the traced batch size
        zeros = features.flatten(1)[:, 0].float() * 0
        return zeros, zeros + 1

    def spread(self, u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return gamma - u  # one: no floor to apply, nothing is divided


@ALIGNERS.register("knn-level")
class KNNLevel(KNNAligner):
    """The k nearest training images give u = their mean raw-map mean and gamma = their mean image score: the
    typical normal image scores 1, as with `knn`, but the scale is the level above the map's floor, not the spread
    of the scores (the issue's second-best oracle, (map mean, mean image score))."""

    def stats(self, features, class_names=None):
        distances, indices = self.neighbours_of(self.descriptor(features))
        keep = self.same_product(distances)
        return (
            neighbourhood_mean_std(self.train_map_means[indices], keep)[0],
            neighbourhood_mean_std(self.train_scores[indices], keep)[0],
        )
