"""The one inference path, shared by `Detector.infer` and the exported graph (export.ExportedDetector)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cada import tiles
from cada.backbones import folded_batchnorms
from cada.data.dataset import normalize
from cada.engine.device import autocast, module_device
from cada.scoring import align, aligned_scores, image_score, smooth


@dataclass
class BatchResult:
    """Per-image outputs of one batch. `maps` is the smoothed base map; aligned = (maps - u) / spread, and the
    aligned score is the base score aligned so, plus `offset` where the aligner scores the image as a whole
    (Aligner.score_offset). A tiled run's tiles are aligned each by their own u and spread: there `aligned` holds
    the images' aligned scores and maps as combined from their tiles (cada.tiles)."""

    maps: torch.Tensor  # B x H x W
    base_scores: torch.Tensor  # B
    u: torch.Tensor  # B
    spread: torch.Tensor  # B, gamma - u kept away from zero
    align_features: torch.Tensor  # B (B x tiles with tiles) x C x h x w, what the aligner read
    offset: torch.Tensor | None = None  # B, added to the aligned scores only (None: nothing)
    aligned: tuple[torch.Tensor, torch.Tensor] | None = None  # tiled runs: (aligned scores B, aligned maps B x H x W)

    @property
    def aligned_scores(self) -> torch.Tensor:
        if self.aligned is not None:
            return self.aligned[0]
        return aligned_scores(self.base_scores, self.u, self.spread, self.offset)

    @property
    def aligned_maps(self) -> torch.Tensor:
        return align(self.maps, self.u, self.spread) if self.aligned is None else self.aligned[1]

    def cpu(self) -> BatchResult:
        aligned = None if self.aligned is None else (self.aligned[0].cpu(), self.aligned[1].cpu())
        offset = None if self.offset is None else self.offset.cpu()
        return BatchResult(
            self.maps.cpu(),
            self.base_scores.cpu(),
            self.u.cpu(),
            self.spread.cpu(),
            self.align_features.cpu(),
            offset,
            aligned,
        )


def infer(
    method,
    aligner,
    images: torch.Tensor,
    settings,
    class_names: list[str] | None = None,
    precision: torch.dtype | None = None,
) -> BatchResult:
    """uint8 images B x 3 x L x L (L = settings.input_size) -> their BatchResult, on the method's device. The
    method's forward pass runs under autocast to `precision` (None: float32); its outputs, the smoothing and the
    aligner are float32. `class_names` only for the class-aware reference aligner. A tiled run's images are cut
    into tiles, and the tiles' results combined per image (cada.tiles)."""
    count = settings.tile * settings.tile
    if count > 1:
        images = tiles.cut(images, settings.image_size, settings.tile, settings.tile_overlap)
        class_names = None if class_names is None else tiles.per_tile(class_names, settings.tile)
    device = module_device(method)
    with autocast(device, precision), folded_batchnorms():
        output = method(normalize(images, device))
    maps = smooth(output.anomaly_map.float(), settings.smoothing_sigma)
    features = output.align_features.float()
    u, gamma = aligner.stats(features, class_names)
    spread = aligner.spread(u, gamma)
    offset = aligner.score_offset(features)
    scores = image_score(maps, settings.top_fraction)
    if count == 1:
        return BatchResult(maps, scores, u, spread, features, offset)
    tile_scores = tiles.per_image(aligned_scores(scores, u, spread, offset), settings.tile)
    best = tile_scores.argmax(dim=1, keepdim=True)  # each image's most anomalous tile gives its u and spread

    def chosen(values: torch.Tensor) -> torch.Tensor:
        return tiles.per_image(values, settings.tile).gather(1, best)[:, 0]

    base_maps, aligned_maps = (
        tiles.stitch(m, settings.image_size, settings.tile, settings.tile_overlap)
        for m in (maps, align(maps, u, spread))
    )
    base_scores = tiles.per_image(scores, settings.tile).amax(dim=1)
    return BatchResult(
        base_maps,
        base_scores,
        chosen(u),
        chosen(spread),
        features,
        None if offset is None else chosen(offset),
        (tile_scores.amax(dim=1), aligned_maps),
    )


def image_distances(aligner, features: torch.Tensor, settings) -> torch.Tensor | None:
    """Each image's distance to the nearest training image (tiled: the largest of its tiles'), for an aligner with
    that signal (knn); None otherwise."""
    distance = aligner.nearest_distance(features)
    if distance is None or settings.tile == 1:
        return distance
    return tiles.per_image(distance, settings.tile).amax(dim=1)
