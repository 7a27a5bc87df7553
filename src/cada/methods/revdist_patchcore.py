"""RevDist and PatchCore on one frozen encoder, their maps normalised per image by look-alike training images.

Why. RevDist ranks grid's defects well and keeps the calibrated threshold honest; PatchCore ranks what RevDist
misses on magnetic_tile. Together, on realmix, realmix-extra and their 6-product mix, the per-product and the
pooled I-AUROC rose over RevDist alone, for about its training time (docs/results/default-method.md): the
default method (config.DEFAULT_METHOD).

How. One encoder pass feeds RevDist's bottleneck and decoder (its 1 - cosine map) and a PatchCore memory bank
(the nearest-patch distance map), built from the same frozen features. The two maps live on unrelated scales,
and which of them is informative differs by product, so each is normalised per image as the `knn` aligner does:
the k training images nearest in RevDist's bottleneck descriptor give that map's normal image-score (mean, std),
and the map becomes 1 + (map - mean) / (3 std), on which the typical normal image scores 1 and one normal standard
deviation is 1/3. The anomaly map is (1 - w) x RevDist's + w x PatchCore's (w = `patchcore_weight`): a product
whose RevDist scores scatter gets less of RevDist's noise than raw maps added would give it. The map is thus
aligned already; the run's aligner is `distance-only` (knn-distance's whole-image term and unfamiliar signal,
the map left as it is): aligning it a second time by the same neighbours lowered the pooled I-AUROC
(docs/results/default-method.md).

The normalisers are fitted after the base: one pass over the training images gives each map's statistics, with
PatchCore leaving each image's own patches out and each image left out of its own neighbours, so that the
training images' maps look like those of unseen normal images. That pass keeps the maps at their own resolutions
(`MapPieces`), from which `training_output` gives the aligner the same maps without searching the bank again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from cada.data.dataset import normalize
from cada.engine import Trainer
from cada.lookalike import LookAlikes, map_statistics
from cada.methods.base import MethodOutput
from cada.methods.patchcore import PatchCore, PatchCoreSettings
from cada.methods.revdist import OneClassBottleneck, RevDist, ReverseDecoder, mean_upsampled, scale_distances
from cada.registry import METHODS
from cada.scoring import align

# The image score the per-map normalisers read: the pipeline's defaults (Gaussian sigma 4, mean of the top 1%).
SMOOTHING_SIGMA, TOP_FRACTION = 4.0, 0.01


@dataclass
class RevDistPatchCoreSettings(PatchCoreSettings):
    """PatchCore's options for the memory bank, `patchcore_weight` (w: the map is (1 - w) x RevDist's + w x
    PatchCore's, both normalised) and `normaliser_neighbours` (the k look-alike training images that normalise
    each map, as the knn aligner's)."""

    # A 1% coreset instead of PatchCore's 10%: on realmix, realmix-extra and their mix the pooled I-AUROC came out
    # as high or higher, for less than half the training and a third of the evaluation time
    # (docs/results/default-method.md).
    coreset_ratio: float = 0.01
    patchcore_weight: float = 0.25
    normaliser_neighbours: int = 20
    RANGES: ClassVar[dict[str, str]] = {
        **PatchCoreSettings.RANGES,
        "patchcore_weight": "[0, 1]",
        "normaliser_neighbours": "[2, 1000]",
    }


def _paper(settings) -> None:
    # the map is aligned already: another knn alignment of it lowered the pooled I-AUROC
    # (docs/results/default-method.md)
    settings.align = "distance-only"


def _cpu(settings) -> None:
    settings.backbone = "efficientnet_lite2"  # RevDist's (methods/revdist.py); the bank reads the same encoder


@METHODS.register("revdist-patchcore", options=RevDistPatchCoreSettings, presets={"paper": _paper, "cpu": _cpu})
class RevDistPatchCore(PatchCore):
    score_scale = 1.0  # the map is on the normalised scale: a normal image scores about 1
    options: RevDistPatchCoreSettings

    # RevDist's training, on this module's encoder, bottleneck and decoder
    trainable_parameters = RevDist.trainable_parameters
    int8_modules = RevDist.int8_modules
    objective = RevDist.objective

    def reconstruct(self, encoded: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embedding = self.bottleneck(encoded)
        return embedding, self.decoder(embedding)

    def __init__(
        self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None, **options
    ):
        own = RevDistPatchCoreSettings(**options)
        bank = {item.name: getattr(own, item.name) for item in fields(PatchCoreSettings)}
        super().__init__(backbone, image_size, pretrained, weights_path, **bank)
        self.options = own
        channels = tuple(self.encoder.channels)
        self.bottleneck = OneClassBottleneck(channels)
        self.decoder = ReverseDecoder(channels)
        self.align_channels = self.bottleneck.out_channels
        self.normalise_revdist = LookAlikes(self.align_channels, own.normaliser_neighbours)
        self.normalise_patchcore = LookAlikes(self.align_channels, own.normaliser_neighbours)
        self._training_pieces: MapPieces | None = None  # fit's training images, kept by fit_normalisers

    def _normalisers(self) -> tuple[LookAlikes, LookAlikes]:
        return self.normalise_revdist, self.normalise_patchcore

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("normalise_revdist", "normalise_patchcore"):  # sized by the training set: resize to the stored
            stored = state_dict.get(f"{prefix}{name}.train_descriptors")
            if stored is not None and stored.dim() == 2:
                getattr(self, name)._allocate(*stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def component_pieces(self, x: torch.Tensor, image_index: torch.Tensor | None = None) -> MapPieces:
        """The raw maps at their own resolutions; `image_index`: see PatchCore.patch_scores."""
        encoded = self.encoder(x)
        embedding, decoded = self.reconstruct(encoded)
        patch_scores = self.patch_scores(x, image_index, encoded)[0]
        return MapPieces(scale_distances(encoded, decoded), patch_scores, embedding)

    def component_maps(
        self, x: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(RevDist's map, PatchCore's map, RevDist's bottleneck), raw; `image_index`: see PatchCore.patch_scores."""
        return self._full_size(self.component_pieces(x, image_index), x.shape[-1])

    def _full_size(self, pieces: MapPieces, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        revdist = mean_upsampled(pieces.revdist_scales, size)
        return revdist, self.upsampled(pieces.patch_scores, (size, size)), pieces.embedding

    def forward(self, x: torch.Tensor, image_index: torch.Tensor | None = None) -> MethodOutput:
        return self._fused(*self.component_maps(x, image_index), image_index)

    def training_output(self, x: torch.Tensor, image_index: torch.Tensor) -> MethodOutput:
        """From the pieces `fit_normalisers` kept, when it ran in this process: the PatchCore search over the
        training images, the slowest part of training, then runs once instead of twice."""
        if self._training_pieces is None:
            return self(x, image_index)
        return self._fused(*self._full_size(self._training_pieces.select(image_index), x.shape[-1]), image_index)

    def _fused(
        self, revdist: torch.Tensor, patchcore: torch.Tensor, embedding: torch.Tensor, image_index: torch.Tensor | None
    ) -> MethodOutput:
        embedding = embedding.float()
        fused = []
        for normaliser, raw in zip(self._normalisers(), (revdist, patchcore)):
            u, gamma = normaliser.normal_stats(embedding, leave_out=image_index)
            fused.append(align(raw.float(), u, normaliser.spread(u, gamma)))
        weight = self.options.patchcore_weight
        return MethodOutput((1 - weight) * fused[0] + weight * fused[1], embedding)

    def build(self, images: torch.Tensor, settings, generator: torch.Generator, trainer: Trainer) -> None:
        """After RevDist's training: PatchCore's memory bank from the same encoder, then the per-map normalisers
        from one pass over the training images (module docstring)."""
        super().build(images, settings, generator, trainer)
        self.fit_normalisers(images, settings.batch_size, trainer)

    @torch.no_grad()
    def fit_normalisers(self, images: torch.Tensor, batch_size: int, trainer: Trainer) -> None:
        """Each map's normal statistics from one pass over `images` (fit's); keeps the maps' pieces for
        `training_output`."""
        self.eval()
        self._training_pieces = None
        kept: list[MapPieces] = []
        statistics: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="map normalisers", disable=not trainer.progress, leave=False):
            trainer.stop_point("normalising the RevDist and PatchCore maps")
            batch = images[start : start + batch_size]
            index = torch.arange(start, start + len(batch), device=trainer.device)
            with trainer.autocast():
                pieces = self.component_pieces(normalize(batch, trainer.device), index)
                *maps, _ = self._full_size(pieces, batch.shape[-1])
            kept.append(pieces)
            for maps_statistics, raw in zip(statistics, maps):
                maps_statistics.append(map_statistics(raw.float(), SMOOTHING_SIGMA, TOP_FRACTION))
        pieces = MapPieces.cat(kept)
        for normaliser, maps_statistics in zip(self._normalisers(), statistics):
            normaliser.learn(pieces.embedding.float(), torch.cat(maps_statistics), self.options.normaliser_neighbours)
        self._training_pieces = pieces


@dataclass
class MapPieces:
    """RevDist's per-scale 1 - cosine maps, PatchCore's patch scores and RevDist's bottleneck, one row an image:
    what the method's map is made from, at about 26 KB an image (Lite2, 256 px) instead of 512 KB full size."""

    revdist_scales: list[torch.Tensor]
    patch_scores: torch.Tensor
    embedding: torch.Tensor

    @staticmethod
    def cat(parts: list[MapPieces]) -> MapPieces:
        scales = [torch.cat(scale) for scale in zip(*(part.revdist_scales for part in parts))]
        return MapPieces(scales, torch.cat([p.patch_scores for p in parts]), torch.cat([p.embedding for p in parts]))

    def select(self, index: torch.Tensor) -> MapPieces:
        scales = [scale[index] for scale in self.revdist_scales]
        return MapPieces(scales, self.patch_scores[index], self.embedding[index])
