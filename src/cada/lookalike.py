"""Look-alike training images: the k training images nearest to an image in a global descriptor give its normal
image-score statistics, without class names. Below both `methods/` and `align/`: the `knn` aligners
(align/knn.py) align scores by it, and `revdist-patchcore` normalises each of its two maps by it.

Each image is summarised by a global descriptor (features averaged over space, centred on the training mean and
L2-normalised). The image scores of its k nearest training images give a normal (mean, std), and the image score
is aligned to 1 + (score - mean) / (3 std) (`zscore_alignment`): when the neighbours are images of the same
product, this is the per-product z-score that knowing the product would give. A product with fewer than k
training images would borrow the rest from other products, whose scores lie elsewhere: neighbours beyond the
unfamiliar level below are left out of the mean (`same_product`), and in the spread they count as the typical
spread of the training images' neighbourhoods, so that a few images of a product cannot make it narrow
(docs/results/aligners.md: products with fewer training images than neighbours).

The distance to the nearest training image is a free "unfamiliar product" signal. `reference_distance` is the
99th percentile of the training images' leave-one-out nearest distances; an image is unfamiliar beyond
UNFAMILIAR_MARGIN times that (`unfamiliar_reference`). The margin is measured, not a convention: the anomalous
images of trained products lie near the reference, every image of a product never trained on far beyond twice it
(docs/results/aligners.md: the unfamiliar signal; benchmarks/unfamiliar.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cada.neighbours import nearest_neighbours
from cada.scoring import image_score, smooth

# Columns of the per-image statistics that aligners learn from: mean, max and std of the raw map, and the image
# score (top fraction of the smoothed map), the value the one threshold is applied to.
MEAN, MAX, STD, SCORE = 0, 1, 2, 3
# Scores normalised by their normal (mean, std) become 1 + (score - mean) / (3 std): a rank-equivalent z-score
# whose typical normal image scores 1 and whose map is 0 three std below that.
ZSCORE_WIDTH = 3.0
REFERENCE_QUANTILE = 0.99  # of the leave-one-out nearest distances in training: the "familiar" level
UNFAMILIAR_MARGIN = 2.0  # x the reference: between trained products' anomalies and other products (docstring)
# An image far from every training image (beyond the unfamiliar level itself) keeps the neighbours within this
# factor of its nearest distance, so that it is still aligned by a neighbourhood rather than by two images.
FAR_NEIGHBOURHOOD = 1.5
# The smallest spread used, as a fraction of the typical one: a neighbourhood of near-identical values must not
# blow a tiny difference up. Runs store the floors, so the typical spreads are read back from them.
SPREAD_FLOOR = 0.1


def map_statistics(raw_maps: torch.Tensor, smoothing_sigma: float, top_fraction: float) -> torch.Tensor:
    """B x 4 statistics of B x H x W raw maps, in the column order MEAN, MAX, STD, SCORE."""
    raw = raw_maps.flatten(1)
    score = image_score(smooth(raw_maps, smoothing_sigma), top_fraction)
    return torch.stack([raw.mean(dim=1), raw.amax(dim=1), raw.std(dim=1), score], dim=1)


def zscore_alignment(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, gamma) that align an image score with normal (mean, std) to 1 + (score - mean) / (ZSCORE_WIDTH std)."""
    return mean - ZSCORE_WIDTH * std, mean


class SpreadFloor(nn.Module):
    """State that turns (u, gamma) into a spread: `min_spread` keeps gamma - u away from zero (and positive, so
    alignment never flips the order of scores), a fraction of the typical spread seen in training. Every aligner
    and `LookAlikes` has one; its device is where the module's state lives."""

    min_spread: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("min_spread", torch.tensor(1e-6))

    @property
    def device(self) -> torch.device:
        """Where the state lives: state sized while fitting (or loading) is made here."""
        return self.min_spread.device

    def spread(self, u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return torch.clamp(gamma - u, min=self.min_spread)


class LookAlikes(SpreadFloor):
    """The training images' descriptors and score statistics, and the look-alike (u, gamma) of any image.

    Its state is buffers sized by the training set (`_allocate`), saved with the model. The `knn` aligners are
    LookAlikes that are also Aligners.
    """

    centre: torch.Tensor
    train_descriptors: torch.Tensor
    train_scores: torch.Tensor
    train_map_means: torch.Tensor
    reference_distance: torch.Tensor

    def __init__(self, channels: int, neighbours: int):
        super().__init__()
        self.neighbours = neighbours
        self._allocate(0, channels)

    def _allocate(self, n_train: int, channels: int) -> None:
        """Buffers sized for `n_train` training images (their shape is known before the weights are loaded), on
        this module's device."""
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

    def learn(self, features: torch.Tensor, image_stats: torch.Tensor, neighbours: int) -> None:
        """From the training images' features (N x C x h x w) and `map_statistics` (N x 4)."""
        if len(features) < 2:
            raise ValueError("at least two training images are needed: the nearest give each image its normal scores")
        self.neighbours = neighbours
        self._allocate(len(features), features.shape[1])
        self.centre.copy_(features.float().mean(dim=(0, 2, 3)))
        self.train_descriptors.copy_(self.descriptor(features))
        self.train_scores.copy_(image_stats[:, SCORE])
        self.train_map_means.copy_(image_stats[:, MEAN])
        distances, indices = self.neighbours_of(self.train_descriptors, self.every_training_image())
        self.reference_distance.copy_(distances[:, 0].quantile(REFERENCE_QUANTILE))
        _, std = neighbourhood_mean_std(self.train_scores[indices], self.same_product(distances))
        self.min_spread.copy_((SPREAD_FLOOR * ZSCORE_WIDTH * std.median()).clamp(min=1e-6))

    def normal_stats(
        self, features: torch.Tensor, leave_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, gamma) of the look-alikes' image scores (`zscore_alignment`); `leave_out`: see neighbours_of (the
        training images' own statistics, as if unseen)."""
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
