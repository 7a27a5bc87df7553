"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a memory bank of normal patch features.

Features. The frozen encoder's stride-8 and stride-16 maps (layer2 and layer3 of wide_resnet50_2) are each
averaged over 3x3 neighbourhoods (zero padding counted, as the reference's unfold-and-average does), the
stride-16 map is upsampled bilinearly to the stride-8 grid and the two are concatenated: one patch feature per
stride-8 position (1536 channels with wide_resnet50_2, 152 with EfficientNet-Lite0).

Memory bank. A greedy k-center coreset of `coreset_ratio` of all training patches (paper: 10%), with the
distances of the greedy computed between random projections of the features to `projection_dim` dimensions
(paper: 128, Johnson-Lindenstrauss); the bank keeps the full features of the chosen patches, in float32.

What differs from the reference, and why. The reference runs the greedy once over every patch of the training
set: it holds all features (VisA: 8,659 images x 1024 patches x 1536 channels = 54 GB in float32, the reason the
paper could not run it on VisA) and costs N x k distance evaluations (8.9M patches x 890k centres x 128 = 1e15
operations: days on 2 CPU cores). Here the patches are streamed: the training images are encoded block by block
(about `coreset_block` patches at a time), the greedy selects `coreset_ratio` of each block on its projections,
and only the full features of the selected patches are kept. This is the first round of the composable-coreset
k-center algorithm (Malkomes et al., NeurIPS 2015): within its block each selection is the usual greedy
2-approximation, and the union covers every training patch within its block's covering radius. The union is
a coreset of the same size as the global greedy's, but its radius is bounded per block, not globally: the
same kind of normal patch met in several blocks gets a centre in each (the global greedy would spend those
centres on rarer patches). Cost: one encoder pass, and N x `coreset_block` x ratio x `projection_dim`
operations for the greedy (linear in N); memory: one block of features plus the bank (ratio x N x C floats,
VisA with wide_resnet50_2: 5.5 GB). With `coreset_block` >= all training patches this is exactly the
reference's greedy.

Search. Patch score = L2 distance to the nearest bank entry, found in chunks of the bank whose query x chunk
distance matrix fits `search_gib`, keeping a running minimum: the full distance matrix is never built.
The map is the patch scores upsampled bilinearly to the input; the Detector smooths it (Gaussian sigma 4), as
for every method, and its image score is the pipeline's (mean of the top 1% of the smoothed map).
PatchCore's own image score, the paper's re-weighted maximum patch score, is `reweighted_score`.

CADA. The aligner reads the frozen encoder's stride-16 map, averaged to stride 32 (`align_features`); the
aligner contract is unchanged. Its targets come from the maps of the training images, and each
of them is scored leaving its own patches out of the bank (`training_output`, which uses `bank_image`, each bank
row's source image): scored against the whole bank, a training image would find its own patches at distance ~0
and its map would be far lower than an unseen normal image's of the same product. Runs saved before bank rows
carried their image (all -1) score training images against the whole bank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cada.backbones import create_encoder
from cada.data.dataset import normalize
from cada.engine import Trainer
from cada.methods.base import BaseMethod, MethodOutput
from cada.neighbours import nearest_neighbours
from cada.registry import METHODS


@dataclass
class PatchCoreSettings:
    """PatchCore (no gradient training): coreset, search memory and image-score re-weighting.

    The memory bank is a greedy k-center coreset of `coreset_ratio` of all training patches (paper: 10%), picked
    with distances between random projections to `projection_dim` dimensions (paper: 128). Selection runs on
    consecutive blocks of about `coreset_block` patches streamed from the encoder, so the full features of the
    training set are never held (see methods/patchcore.py). `search_gib` bounds one chunk of the query x bank
    distance matrix in the nearest-neighbour search. `neighbours` is b of the paper's image-score re-weighting.
    """

    coreset_ratio: float = 0.1
    projection_dim: int = 128
    coreset_block: int = 16384
    search_gib: float = 0.5
    neighbours: int = 9
    RANGES: ClassVar[dict[str, str]] = {
        "coreset_ratio": "(0, 1]",
        "projection_dim": "[1, 4096]",
        "coreset_block": "[1, 16777216]",
        "search_gib": "(0, 1024]",
        "neighbours": "[1, 1000]",
    }


def greedy_coreset(points: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center selection (Gonzalez): begin at `start`, then repeatedly add the point
    farthest from everything selected so far. O(n x k x d) time, O(n) extra memory."""
    n = len(points)
    k = min(k, n)
    points = points.contiguous()
    points_sq = points.pow(2).sum(dim=1)
    min_distance = torch.full((n,), math.inf, dtype=points.dtype, device=points.device)
    distance = torch.empty(n, dtype=points.dtype, device=points.device)
    selected = torch.empty(k, dtype=torch.long, device=points.device)
    # the current centre stays a tensor: on a GPU no step waits for the device
    current = torch.tensor(start, device=points.device)
    for step in range(k):
        selected[step] = current
        if step == k - 1:
            break
        # squared distance of every point to the newest centre: |p|^2 - 2 p.c + |c|^2
        centre = current.view(1)  # a one-element index, not an int: no wait for the device
        torch.addmv(points_sq, points, points[centre][0], alpha=-2.0, out=distance)
        distance.add_(points_sq[centre])
        torch.minimum(min_distance, distance, out=min_distance)
        current = min_distance.argmax()
    return selected


def _paper(settings) -> None:
    # knn, not knn-distance: PatchCore's score is already a nearest-neighbour distance, and adding the global one
    # lowered grid and raised the false positives at the calibrated threshold on mix6 (docs/results/aligners.md).
    settings.align = "knn"


@METHODS.register("patchcore", options=PatchCoreSettings, presets={"paper": _paper})
class PatchCore(BaseMethod):
    # Smooth-L1 alpha for the aligner (paper: 0.1 for RevDist's cosine distances in [0, 1], 10 for UniAD's L2
    # reconstruction errors of EfficientNet features). Patch scores are L2 distances between encoder features
    # too, on UniAD's scale: with ImageNet EfficientNet-Lite0 at 256 px on the synthetic classes, normal maps
    # have mean ~11-16 and max ~19-23, defects max ~48. So alpha = 10: the regressor's loss is quadratic for
    # errors below the typical normal score and linear (robust) above it.
    score_scale = 10.0

    def __init__(
        self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None, **options
    ):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="revdist")
        self.image_size = image_size
        self.grid = image_size // self.encoder.strides[1]  # one patch per stride-8 position
        self.embedding_dim = self.encoder.channels[1] + self.encoder.channels[2]
        self.align_channels = self.encoder.channels[2]
        self.options = PatchCoreSettings(**options)  # Settings.patchcore, handed over by the Detector
        # Size known only after fit: resized to the stored shape when a state dict is loaded.
        self.register_buffer("memory_bank", torch.empty(0, self.embedding_dim))
        # The training image each bank row came from (its index in `fit`'s images; -1: unknown, in runs saved
        # before it was kept), so that the training-set maps can leave each image's own patches out.
        self.register_buffer("bank_image", torch.empty(0, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "memory_bank")
        if stored is not None and stored.dim() == 2 and stored.shape[1] == self.embedding_dim:
            self.memory_bank = torch.empty_like(stored, device=self.memory_bank.device)
            if prefix + "bank_image" not in state_dict:
                state_dict[prefix + "bank_image"] = torch.full((len(stored),), -1, dtype=torch.int32)
            self.bank_image = torch.empty(len(stored), dtype=torch.int32, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- features ------------------------------------------------------------------------------------------
    def local_features(
        self, x: torch.Tensor, encoded: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stride-8 map, stride-16 map), each averaged over 3x3 neighbourhoods; `encoded`: the encoder's output
        for `x` when the caller already has it."""
        _, middle, deep = self.encoder(x) if encoded is None else encoded
        return F.avg_pool2d(middle, 3, stride=1, padding=1), F.avg_pool2d(deep, 3, stride=1, padding=1)

    @staticmethod
    def patch_embedding(middle: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """B x (grid x grid) x C: the stride-16 map upsampled to the stride-8 grid, concatenated, one row a patch."""
        deep = F.interpolate(deep, size=middle.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([middle, deep], dim=1).flatten(2).transpose(1, 2)

    # -- scores --------------------------------------------------------------------------------------------
    def patch_scores(
        self, x: torch.Tensor, image_index: torch.Tensor | None = None, encoded: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores B x h x w, nearest bank index B x h x w, embedding B x hw x C, 3x3-averaged stride-16 map).
        `image_index` (B): these are `fit`'s training images of those indices; their own patches are left out."""
        middle, deep = self.local_features(x, encoded)
        embedding = self.patch_embedding(middle, deep)
        batch, patches, channels = embedding.shape
        exclude = None
        if image_index is not None:
            exclude = (image_index.to(self.bank_image).repeat_interleave(patches), self.bank_image)
        distance, index = nearest_neighbours(
            embedding.reshape(-1, channels), self.memory_bank, budget_gib=self.options.search_gib, exclude=exclude
        )
        shape = (batch,) + middle.shape[-2:]
        return distance.view(shape), index.view(shape), embedding, deep

    def patch_map(self, x: torch.Tensor, image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the anomaly map B x H x W: patch scores upsampled bilinearly to the input, the stride-16 map)."""
        scores, _, _, deep = self.patch_scores(x, image_index)
        return self.upsampled(scores, x.shape[-2:]), deep

    @staticmethod
    def upsampled(scores: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Patch scores B x h x w bilinearly upsampled to the anomaly map, B x H x W (`size`: H, W)."""
        return F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)

    def forward(self, x: torch.Tensor, image_index: torch.Tensor | None = None) -> MethodOutput:
        anomaly_map, deep = self.patch_map(x, image_index)
        return MethodOutput(anomaly_map, self.align_features(deep))

    def training_output(self, x: torch.Tensor, image_index: torch.Tensor) -> MethodOutput:
        return self(x, image_index)

    @staticmethod
    def align_features(deep: torch.Tensor) -> torch.Tensor:
        """What the aligner reads: the frozen encoder's 3x3-averaged stride-16 map, 2x2-averaged to stride 32.

        PatchCore has no bottleneck of its own (RevDist's aligner reads its stride-32 bottleneck). Stride 32 is
        the grid RevDist's aligner reads (8x8 at 256 px) and a quarter of the stride-16 map's memory, which
        matters because `Detector.training_statistics` keeps these for every training image (VisA with
        wide_resnet50_2: 2.1 GiB instead of 8.5). The CADA head (1x1 convs, global average pooling) loses
        little by it.
        """
        return F.avg_pool2d(deep, 2, ceil_mode=True)

    def reweighted_score(self, x: torch.Tensor) -> torch.Tensor:
        """PatchCore's own image score (paper Eq. 7), B: the largest patch score s* = |m_test* - m*|, times
        w = 1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|, with N_b(m*) the b = `neighbours`
        nearest bank entries of m* (m* among them). An image whose worst patch lies in a sparse region of the
        bank (its neighbours far from the test patch as well) keeps more of its score.

        Not used by the protocols: there every method's image score is the top 1% of its smoothed map.
        """
        scores, index, embedding, _ = self.patch_scores(x)
        batch = torch.arange(len(scores), device=scores.device)
        worst = scores.flatten(1).argmax(dim=1)
        s_star = scores.flatten(1)[batch, worst]
        test_patch = embedding[batch, worst]  # B x C
        m_star = self.memory_bank[index.flatten(1)[batch, worst]]
        _, support = nearest_neighbours(
            m_star, self.memory_bank, k=self.options.neighbours, budget_gib=self.options.search_gib
        )
        support_distance = (self.memory_bank[support] - test_patch.unsqueeze(1)).norm(dim=2)  # B x b
        weight = 1 - torch.exp(s_star - torch.logsumexp(support_distance, dim=1))
        return weight * s_star

    # -- fit -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def build(self, images: torch.Tensor, settings, generator: torch.Generator, trainer: Trainer) -> None:
        """The memory bank from normal uint8 images (N x 3 x S x S) in one streamed pass.

        `settings` is the base-training settings: only `batch_size` (encoder batch) is read; PatchCore has
        no iterations and no learning rate. See the module docstring for the blockwise coreset.
        """
        options = self.options
        self.eval()
        projection = torch.randn(self.embedding_dim, options.projection_dim, generator=generator)
        projection = (projection / math.sqrt(options.projection_dim)).to(trainer.device)
        patches_per_image = self.grid * self.grid
        block_images = max(1, options.coreset_block // patches_per_image)
        batch_size = max(1, settings.batch_size)
        starts = list(range(0, len(images), block_images))
        # Centres per block, by cumulative rounding: round(ratio x all patches) in all, at least one per block.
        # Known before any encoding, so the bank is allocated once (no list of pieces concatenated at the end,
        # which would briefly hold the bank twice).
        counts, kept = [], 0
        for start in starts:
            seen = min(start + block_images, len(images)) * patches_per_image
            counts.append(max(1, round(options.coreset_ratio * seen) - kept))
            kept += counts[-1]
        bank = torch.empty(kept, self.embedding_dim, device=trainer.device)
        bank_image = torch.empty(kept, dtype=torch.int32, device=trainer.device)
        filled = 0
        for start, count in tqdm(
            list(zip(starts, counts)), desc="patchcore coreset", disable=not trainer.progress, leave=False
        ):
            block = images[start : start + block_images]
            pieces = []
            for i in range(0, len(block), batch_size):
                trainer.stop_point("building the PatchCore memory bank")
                with trainer.autocast():
                    embedding = self.patch_embedding(
                        *self.local_features(normalize(block[i : i + batch_size], trainer.device))
                    )
                pieces.append(embedding.reshape(-1, self.embedding_dim).float())
            features = torch.cat(pieces)
            del pieces
            first = int(torch.randint(len(features), (1,), generator=generator))
            chosen = greedy_coreset(features @ projection, count, start=first)
            bank[filled : filled + len(chosen)] = features[chosen]
            bank_image[filled : filled + len(chosen)] = start + chosen // patches_per_image
            filled += len(chosen)
            del features
        self.memory_bank = bank if filled == len(bank) else bank[:filled].clone()
        self.bank_image = bank_image[:filled].clone()
