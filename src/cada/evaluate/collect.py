"""Collecting a detector's outputs on a test set once (scores, maps, per-image statistics), in one process or
sharded over several, for the protocols to read."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from cada.data.dataset import iterate_batches, original_mask
from cada.data.mvtec import Sample
from cada.data.resize import crop_to_content
from cada.engine.distributed import batch_shard, is_distributed, is_main, world_size
from cada.metrics import (
    distributed_pixel_metrics,
    pixel_metrics,
)
from cada.scoring import align

PIXEL_RESOLUTIONS = ("model", "original")


@dataclass
class EvalOutputs:
    """Everything the metrics need, for the images that could be read, in sample order."""

    samples: list[Sample]
    maps: torch.Tensor  # N x H x W smoothed base maps
    masks: torch.Tensor  # N x H x W bool
    has_mask: np.ndarray  # N bool: False for anomalous images whose mask file is missing
    base_scores: np.ndarray
    u: np.ndarray
    spread: np.ndarray
    align_features: torch.Tensor | None = None  # N x C x h x w, kept for re-fitting aligners (ablations)
    offset: np.ndarray | None = None  # N, added to the aligned image scores (Aligner.score_offset); None: nothing
    # Pixel metrics at the ground truth's own resolution: per image (height, width) and anomalous pixel count.
    original_sizes: np.ndarray | None = None  # N x 2
    original_anomalous: np.ndarray | None = None  # N
    resize: str = "squash"  # how the images were fitted to the maps' square (cada.data.resize): read when upsampling
    # Tiled runs (cada.tiles) align each tile by its own u and spread: their images' aligned scores and maps are
    # kept as combined from the tiles. Otherwise None: aligned = (base - u) / spread.
    aligned_scores: np.ndarray | None = None
    aligned_maps: torch.Tensor | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @property
    def class_names(self) -> np.ndarray:
        return np.array([s.class_name for s in self.samples])

    @property
    def at_original_resolution(self) -> bool:
        return self.original_sizes is not None

    @cached_property
    def anomalous_pixels(self) -> np.ndarray:
        """Per image, how many of its ground-truth pixels (at the resolution of the pixel metrics) are anomalous."""
        if self.original_anomalous is not None:
            return self.original_anomalous
        return self.masks.flatten(1).sum(1).numpy()

    @cached_property
    def pixels(self) -> np.ndarray:
        """Per image, how many ground-truth pixels it has at the resolution of the pixel metrics."""
        if self.original_sizes is not None:
            return self.original_sizes.prod(axis=1)
        return np.full(len(self.samples), self.masks[0].numel())

    def aligned_map(self, index: int) -> torch.Tensor:
        """Image `index`'s aligned map (a tiled run's as combined from its tiles)."""
        if self.aligned_maps is not None:
            return self.aligned_maps[index]
        u, spread = (torch.from_numpy(values[index : index + 1]) for values in (self.u, self.spread))
        return align(self.maps[index : index + 1], u, spread)[0]

    def pixel_metrics(
        self, index: np.ndarray, u: torch.Tensor, spread: torch.Tensor, aligned: bool, fpr_limit: float
    ) -> dict:
        """Pixel metrics of the images at `index` (all with masks); maps aligned by (u, spread) if `aligned`."""
        source, alignment = self.maps, (u, spread) if aligned else ()
        if aligned and self.aligned_maps is not None:
            source, alignment = self.aligned_maps, ()
        if self.original_sizes is not None:
            maps = _OriginalMaps(source, index, self.original_sizes[index], self.resize, *alignment)
            return pixel_metrics(maps, _OriginalMasks([self.samples[i] for i in index]), fpr_limit)
        return pixel_metrics(_Rows(source, index, *alignment), _Rows(self.masks, index), fpr_limit)


def collect(
    detector,
    samples: list[Sample],
    batch_size: int = 16,
    progress: bool = True,
    keep_features: bool = False,
    cache_dir: str | Path | None = "auto",
    pixel_resolution: str = "model",
) -> EvalOutputs:
    """Run the detector over the test samples once; base and aligned results both come from this pass.

    Class names reach the detector only for the class-aware reference aligner (CaDA-A), which needs them.
    pixel_resolution: "model" compares maps and masks at the model's input size (S x S, masks resized by
    nearest neighbour); "original" compares at each ground truth's own size, the maps bilinearly upsampled
    (the maps are still held at S x S; the metrics read the masks again, an image at a time).
    Under torch.distributed each process runs its share of the batches and keeps its own maps; the per-image
    results are gathered to every process (a `DistributedEvalOutputs`, see there).
    """
    if pixel_resolution not in PIXEL_RESOLUTIONS:
        raise ValueError(f"pixel_resolution must be one of {PIXEL_RESOLUTIONS}, got {pixel_resolution!r}")
    distributed = is_distributed() and world_size() > 1
    if distributed and (keep_features or pixel_resolution != "model" or detector.settings.tile > 1):
        raise ValueError(
            "keeping the alignment features (ablations), pixel metrics at the original resolution and tiled runs "
            "need a single-process evaluation"
        )
    positions = batch_shard(len(samples), batch_size) if distributed else list(range(len(samples)))
    mine = [samples[i] for i in positions]
    kept: list[int] = []
    maps, masks, has_mask, scores, u, spread, offset, features = [], [], [], [], [], [], [], []
    aligned_scores, aligned_maps = [], []  # tiled runs only (see EvalOutputs)
    batches = iterate_batches(
        mine,
        detector.settings.input_size,
        batch_size,
        cache_dir=cache_dir,
        pin_memory=detector.device.type == "cuda",
        resize=detector.settings.resize,
    )
    with tqdm(total=len(samples), desc="evaluating", disable=not (progress and is_main()), leave=False) as bar:
        for batch in batches:
            local = batch["index"].tolist()
            batch_samples = [mine[i] for i in local]
            class_names = [s.class_name for s in batch_samples] if detector.aligner.needs_class_names else None
            result = detector.infer(batch["image"], class_names)
            kept.extend(positions[i] for i in local)
            if keep_features:
                features.append(result.align_features)
            maps.append(result.maps)
            if result.aligned is not None:
                aligned_scores.append(result.aligned[0])
                aligned_maps.append(result.aligned[1])
            masks.append(batch["mask"])
            has_mask.append(batch["has_mask"])
            scores.append(result.base_scores)
            u.append(result.u)
            spread.append(result.spread)
            offset.append(torch.zeros_like(result.u) if result.offset is None else result.offset)
            bar.update(len(local) * world_size())
    if distributed:
        outputs = DistributedEvalOutputs.gather(
            samples, kept, maps, masks, has_mask, scores, u, spread, offset, detector.settings.input_size
        )
    else:
        if not kept:
            raise ValueError("no test image could be read")
        outputs = EvalOutputs(
            [samples[i] for i in kept],
            torch.cat(maps),
            torch.cat(masks),
            torch.cat(has_mask).numpy(),
            base_scores=torch.cat(scores).numpy(),
            u=torch.cat(u).numpy(),
            spread=torch.cat(spread).numpy(),
            align_features=torch.cat(features) if keep_features else None,
            offset=torch.cat(offset).numpy(),
            aligned_scores=torch.cat(aligned_scores).numpy() if aligned_scores else None,
            aligned_maps=torch.cat(aligned_maps) if aligned_maps else None,
        )
    outputs.resize = detector.settings.resize
    if pixel_resolution == "original":
        sizes, counts = [], []
        for sample in tqdm(outputs.samples, desc="reading masks", disable=not progress, leave=False):
            mask = original_mask(sample)
            sizes.append(mask.shape)
            counts.append(np.count_nonzero(mask))
        outputs.original_sizes, outputs.original_anomalous = np.array(sizes), np.array(counts)
    missing = [s.path for s, ok in zip(outputs.samples, outputs.has_mask) if not ok]
    if missing and is_main():
        warnings.warn(
            f"{len(missing)} anomalous test image(s) have no mask file (e.g. {missing[0]}); they count for the "
            "image metrics and are left out of the pixel metrics"
        )
    return outputs


class DistributedEvalOutputs(EvalOutputs):
    """EvalOutputs of a multi-process evaluation. Per-image results (scores, u, spread, labels, mask
    presence, anomalous-pixel counts) are global, in sample order, on every process; `maps` and `masks` hold
    only this process's images (`local_rows` maps a global row to its local one, -1 elsewhere).

    Pixel metrics never gather the maps: the few anomalous pixels (score and region size) are all-gathered,
    and each process counts its own normal pixels below and at every distinct anomalous score, summed by an
    all-reduce; that is all the exact metrics need (cada.metrics), so the results equal a single process's.
    """

    local_rows: np.ndarray

    @classmethod
    def gather(cls, samples, kept, maps, masks, has_mask, scores, u, spread, offset, image_size: int):
        size = (0, image_size, image_size)
        local_maps = torch.cat(maps) if maps else torch.empty(size)
        local_masks = torch.cat(masks) if masks else torch.empty(size, dtype=torch.bool)
        mine = {
            "positions": np.asarray(kept, dtype=np.int64),
            "has_mask": torch.cat(has_mask).numpy() if has_mask else np.empty(0, bool),
            "anomalous": local_masks.flatten(1).sum(1).numpy(),
            **{
                key: torch.cat(values).numpy() if values else np.empty(0, np.float32)
                for key, values in (("scores", scores), ("u", u), ("spread", spread), ("offset", offset))
            },
        }
        pieces: list[dict] = [{}] * world_size()
        dist.all_gather_object(pieces, mine)
        positions = np.concatenate([p["positions"] for p in pieces])
        if not len(positions):
            raise ValueError("no test image could be read")
        order = np.argsort(positions, kind="stable")
        joined = {key: np.concatenate([p[key] for p in pieces])[order] for key in mine}
        outputs = cls(
            [samples[i] for i in joined["positions"]],
            local_maps,
            local_masks,
            joined["has_mask"],
            joined["scores"],
            joined["u"],
            joined["spread"],
            None,
            joined["offset"],
        )
        outputs.__dict__["anomalous_pixels"] = joined["anomalous"]  # the cached_property, from the gathered counts
        where = {int(position): row for row, position in enumerate(joined["positions"])}
        outputs.local_rows = np.full(len(positions), -1, dtype=np.int64)
        outputs.local_rows[[where[int(p)] for p in mine["positions"]]] = np.arange(len(mine["positions"]))
        outputs.__dict__["pixels"] = np.full(len(positions), image_size * image_size)  # no local mask needed
        return outputs

    def pixel_metrics(
        self, index: np.ndarray, u: torch.Tensor, spread: torch.Tensor, aligned: bool, fpr_limit: float
    ) -> dict:
        local = self.local_rows[index]
        here = local >= 0
        rows = local[here]
        maps = _Rows(self.maps, rows, *((u[torch.from_numpy(here)], spread[torch.from_numpy(here)]) if aligned else ()))
        return distributed_pixel_metrics(maps, _Rows(self.masks, rows), fpr_limit)


class _Rows:
    """Images `index` of an N x H x W tensor, aligned by (u, spread) if given, made only when a slice is read:
    pixel_metrics reads a chunk of images at a time, so no full copy of the subset or of its aligned maps."""

    def __init__(self, tensor: torch.Tensor, index: np.ndarray, u=None, spread=None):
        self.tensor, self.index, self.u, self.spread = tensor, torch.from_numpy(index), u, spread
        self.shape = (len(index), *tensor.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        chunk = self.tensor[self.index[rows]]
        return chunk if self.u is None else align(chunk, self.u[rows], self.spread[rows])


class _OriginalMaps:
    """Images `index` of the S x S maps, aligned if (u, spread) are given, cropped to the image (a letterbox's
    padding off) and bilinearly upsampled to each one's original (height, width) when read: one image at a time
    (see cada.metrics.pixel_metrics)."""

    def __init__(self, maps: torch.Tensor, index: np.ndarray, sizes: np.ndarray, resize: str, u=None, spread=None):
        self.maps, self.index, self.sizes, self.resize, self.u, self.spread = maps, index, sizes, resize, u, spread

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        height, width = self.sizes[i].tolist()
        small = crop_to_content(self.maps[self.index[i]], width, height, self.resize)[None, None]
        if self.u is not None:
            small = align(small, self.u[i : i + 1], self.spread[i : i + 1])
        return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


class _OriginalMasks:
    """The ground truth of `samples` at its own resolution, read from the files when asked for."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return original_mask(self.samples[i])
