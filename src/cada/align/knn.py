"""Non-parametric alignment: the k training images that look most like this one give its normal statistics.

Each image is summarised by a global descriptor (its align features averaged over space, centred on the
training mean and L2-normalised). The image scores of its k nearest training images give a normal (mean, std),
and the image score is aligned to 1 + (score - mean) / (3 std) (`zscore_alignment`): when the neighbours are
images of the same product, this is the per-product z-score that knowing the product would give. A product with
fewer than k training images would borrow the rest from other products, whose scores lie elsewhere: neighbours
beyond the unfamiliar level below are left out of the mean (`same_product`), and in the spread they count as the
typical spread of the training images' neighbourhoods, so that a few images of a product cannot make it narrow
(docs/results/aligners.md: products with fewer training images than neighbours).

The distance to the nearest training image is a free "unfamiliar product" signal. `reference_distance` is the
99th percentile of the training images' leave-one-out nearest distances; an image is unfamiliar beyond
UNFAMILIAR_MARGIN times that (`unfamiliar_reference`). The margin is measured, not a convention: the anomalous
images of trained products lie near the reference, every image of a product never trained on far beyond twice it
(docs/results/aligners.md: the unfamiliar signal; benchmarks/unfamiliar.py).

`knn-distance` (the default) also scores that distance: an image farther from its nearest training image than its
neighbours are from theirs is unusual as a whole, which the map's top pixels can miss (uneven lighting, a part
that looks wrong everywhere). The distance, z-scored against the neighbours' own leave-one-out nearest distances,
times `distance_weight` is added to the aligned image score (`score_offset`), not to the map: a property of the
whole image has no place in it (docs/results/aligners.md: knn-distance against knn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cada.align.base import MEAN, SCORE, ZSCORE_WIDTH, Aligner, zscore_alignment
from cada.neighbours import nearest_neighbours
from cada.registry import ALIGNERS

REFERENCE_QUANTILE = 0.99  # of the leave-one-out nearest distances in training: the "familiar" level
UNFAMILIAR_MARGIN = 2.0  # x the reference: between trained products' anomalies and other products (docstring)
# An image far from every training image (beyond the unfamiliar level itself) keeps the neighbours within this
# factor of its nearest distance, so that it is still aligned by a neighbourhood rather than by two images.
FAR_NEIGHBOURHOOD = 1.5
# The smallest spread the knn aligners use, as a fraction of the typical one: a neighbourhood of near-identical
# values must not blow a tiny difference up. Runs store the floors, so the typical spreads are read back from them.
SPREAD_FLOOR = 0.1


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

    def neighbours_of(
        self, descriptors: torch.Tensor, leave_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances B x k, indices B x k) of the k nearest training images (Euclidean between unit descriptors).
        `leave_out` (B): the queries are these training images, each left out of its own neighbours."""
        k = min(self.neighbours, len(self.train_descriptors) - int(leave_out is not None))
        exclude = None
        if leave_out is not None:
            exclude = (leave_out, torch.arange(len(self.train_descriptors), device=leave_out.device))
        return nearest_neighbours(descriptors, self.train_descriptors, k, exclude=exclude)

    def every_training_image(self) -> torch.Tensor:
        return torch.arange(len(self.train_descriptors), device=self.device)

    def same_product(self, distances: torch.Tensor) -> torch.Tensor:
        """B x k mask of the neighbours (at ascending `distances`) that count as images of the query's product:
        those within the unfamiliar level, or within FAR_NEIGHBOURHOOD x the nearest distance for a query beyond
        it; always the nearest two (a spread needs two)."""
        limit = torch.clamp(FAR_NEIGHBOURHOOD * distances[:, :1], min=UNFAMILIAR_MARGIN * self.reference_distance)
        keep = distances <= limit
        keep[:, :2] = True
        return keep

    @property
    def typical_std(self) -> torch.Tensor:
        """The median leave-one-out std of the training images' neighbours' scores (what `min_spread` is made of)."""
        return self.min_spread / (SPREAD_FLOOR * ZSCORE_WIDTH)

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        if len(features) < 2:
            raise ValueError("at least two training images are needed: the nearest give each image its normal scores")
        self.neighbours = settings.neighbours
        self._allocate(len(features), features.shape[1])
        self.centre.copy_(features.float().mean(dim=(0, 2, 3)))
        self.train_descriptors.copy_(self.descriptor(features))
        self.train_scores.copy_(image_stats[:, SCORE])
        self.train_map_means.copy_(image_stats[:, MEAN])
        distances, indices = self.neighbours_of(self.train_descriptors, self.every_training_image())
        self.reference_distance.copy_(distances[:, 0].quantile(REFERENCE_QUANTILE))
        _, std = neighbourhood_mean_std(self.train_scores[indices], self.same_product(distances))
        self.min_spread.copy_((SPREAD_FLOOR * ZSCORE_WIDTH * std.median()).clamp(min=1e-6))
        return []

    def stats(self, features, class_names=None, leave_out: torch.Tensor | None = None):
        """(u, gamma); `leave_out`: see neighbours_of (the training images' own statistics, as if unseen)."""
        distances, indices = self.neighbours_of(self.descriptor(features), leave_out)
        keep = self.same_product(distances)
        return zscore_alignment(*neighbourhood_mean_std(self.train_scores[indices], keep, self.typical_std))

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


def neighbourhood_mean_std(
    values: torch.Tensor, keep: torch.Tensor, typical_std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of B x k neighbours' `values` over those `keep` marks as the query's product.
    With `typical_std`, the k - n left out count in the variance at that std: (n s^2 + (k - n) typical^2) / k,
    where s is the kept ones' sample std (0 for one); with all k kept, that is their sample std."""
    weight = keep.to(values.dtype)
    count = weight.sum(dim=1)
    mean = (values * weight).sum(dim=1) / count
    variance = ((values - mean[:, None]) ** 2 * weight).sum(dim=1) / (count - 1).clamp(min=1)
    if typical_std is not None:
        k = keep.shape[1]
        variance = (count * variance + (k - count) * typical_std**2) / k
    return mean, variance.sqrt()
