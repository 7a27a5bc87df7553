"""The two protocols and the results table.

absolute-unified: every test image of every class pooled, one ROC/PR curve (one threshold for all).
model-unified: the same metrics per class, then averaged over classes (each class its own threshold).

Metrics (fractions; None where undefined, e.g. pixel metrics of a class without anomalous pixels):
I-AUROC, I-AP, I-F1-max, P-AUROC, P-AP, P-F1-max and AUPRO (FPR limit 0.3), all exact (cada.metrics).
The F1-max thresholds are reported for absolute-unified rows and per class; model-unified rows have
none (each class has its own), so they are None there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from cada.align.class_aware import oracle_alignment
from cada.data.dataset import iterate_batches, original_mask
from cada.data.mvtec import Sample
from cada.data.resize import crop_to_content
from cada.engine.distributed import batch_shard, is_distributed, is_main, world_size
from cada.metrics import (
    HEADERS,
    METRICS,
    binary_metrics,
    distributed_pixel_metrics,
    pixel_metrics,
    pooled_auroc_ceiling,
)
from cada.scoring import align, aligned_scores
from cada.threshold import decision_metrics, threshold_at_fpr

PROTOCOLS = ("absolute-unified", "model-unified")
THRESHOLDS = ("i_f1max_threshold", "p_f1max_threshold")  # score values, not percentages
FPR_LIMIT = 0.3  # AUPRO integrates up to this false-positive rate
DECISIONS = ("fpr", "recall", "precision", "f1")  # at the stored threshold, when the run has one
PIXEL_RESOLUTIONS = ("model", "original")
ORACLE = "oracle"  # the class-aware reference row: per-product z-score of the image score (class names known)
REFERENCE_FPR = 0.01  # without a calibrated threshold, the pooled threshold at this FPR on the test normals
SIGNIFICANCE = 0.01  # a calibrated FPR target counts as missed when chance would flag as many normals this rarely


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


def _safe(metric, scores, labels) -> dict | None:
    """Metrics when both kinds of sample are present, else None (e.g. a class with no anomalous test image)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    return metric(scores, labels)


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


def image_scores(outputs: EvalOutputs, index: np.ndarray, aligned: bool) -> np.ndarray:
    if aligned and outputs.aligned_scores is not None:
        return outputs.aligned_scores[index]
    scores = outputs.base_scores[index]
    if not aligned:
        return scores
    offset = None if outputs.offset is None else torch.from_numpy(outputs.offset[index])
    u, spread = torch.from_numpy(outputs.u[index]), torch.from_numpy(outputs.spread[index])
    return aligned_scores(torch.from_numpy(scores), u, spread, offset).numpy()


def subset_metrics(outputs: EvalOutputs, index: np.ndarray, aligned: bool, fpr_limit: float = FPR_LIMIT) -> dict:
    """METRICS and F1-max THRESHOLDS of the images at `index`, with base or aligned scores (None: undefined)."""
    u, spread = torch.from_numpy(outputs.u[index]), torch.from_numpy(outputs.spread[index])
    row = dict.fromkeys(METRICS + THRESHOLDS)
    image = _safe(binary_metrics, image_scores(outputs, index, aligned), outputs.labels[index])
    if image:
        row.update(
            i_auroc=image["auroc"], i_ap=image["ap"], i_f1max=image["f1max"], i_f1max_threshold=image["f1max_threshold"]
        )
    keep = outputs.has_mask[index]
    pixel_index = index[keep]
    n_anomalous = int(outputs.anomalous_pixels[pixel_index].sum())
    if 0 < n_anomalous < int(outputs.pixels[pixel_index].sum()):  # both kinds of pixel present
        pixel = outputs.pixel_metrics(pixel_index, u[keep], spread[keep], aligned, fpr_limit)
        row.update(
            p_auroc=pixel["auroc"],
            p_ap=pixel["ap"],
            p_f1max=pixel["f1max"],
            aupro=pixel["aupro"],
            p_f1max_threshold=pixel["f1max_threshold"],
        )
    return row


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def threshold_metrics(
    outputs: EvalOutputs, aligned: bool, threshold: float, classes: list[str]
) -> tuple[dict, dict, dict[str, dict]]:
    """Decisions at one stored threshold: (pooled, mean over classes, per class) FPR, recall, precision, F1.

    Both summary rows also get the threshold and the spread of per-class false-positive rates: with one
    threshold for every class, an even spread is what absolute-unified alignment is for.
    """
    labels, class_names = outputs.labels, outputs.class_names
    everything = np.arange(len(labels))
    pooled = decision_metrics(image_scores(outputs, everything, aligned), labels, threshold)
    per_class = {}
    for name in classes:
        index = np.flatnonzero(class_names == name)
        per_class[name] = decision_metrics(image_scores(outputs, index, aligned), labels[index], threshold)
    averaged = {key: _mean([per_class[name][key] for name in classes]) for key in DECISIONS}
    class_fprs = [m["fpr"] for m in per_class.values() if m["fpr"] is not None]
    spread = {
        "threshold": threshold,
        "class_fpr_min": min(class_fprs, default=None),
        "class_fpr_max": max(class_fprs, default=None),
        "class_fpr_std": float(np.std(class_fprs)) if class_fprs else None,
    }
    return {**pooled, **spread}, {**averaged, **spread}, per_class


def detector_results(detector, outputs: EvalOutputs) -> dict:
    """`results_table` of a detector's outputs: its base map and, with an aligner, its aligned map, with the run's
    thresholds and class-aware oracle."""
    aligners = ("none",) if detector.settings.align == "none" else ("none", detector.settings.align)
    calibration = detector.calibration or {}
    return results_table(
        outputs,
        detector.settings.method,
        aligners,
        detector.thresholds,
        detector.training_info.get("class_score_stats"),
        calibration.get("target_fpr") if calibration.get("how") == "fpr" else None,
    )


def results_table(
    outputs: EvalOutputs,
    method: str,
    aligners: tuple[str, ...],
    thresholds: dict[str, float] | None = None,
    class_score_stats: dict | None = None,
    target_fpr: float | None = None,
) -> dict:
    """{"rows": [...], "per_class": {align: {class: metrics}}, "per_product": ...} for the base ("none") and each
    aligner.

    With `thresholds` ({align name: threshold}) rows and classes also get the decision metrics at it. With
    `class_score_stats` (the run's per-class training score statistics), "oracle" holds the rows of the class-aware
    ORACLE (image metrics only), the ceiling of any alignment of this base. "per_product" gives each product's
    median aligned normal score and its FPR and recall at one pooled threshold (see `per_product_decisions`).
    With `target_fpr` (the thresholds were calibrated at that false-positive rate), "calibration_check" says per
    threshold whether the test normals bear it out (see `calibration_check`).
    """
    class_names = outputs.class_names
    classes = sorted(set(class_names))
    everything = np.arange(len(outputs.samples))
    rows, per_class = [], {}
    for align_name in aligners:
        aligned = align_name != "none"
        per_class[align_name] = {
            name: subset_metrics(outputs, np.flatnonzero(class_names == name), aligned) for name in classes
        }
        pooled = subset_metrics(outputs, everything, aligned)
        averaged = {key: _mean([per_class[align_name][name][key] for name in classes]) for key in METRICS}
        averaged.update(dict.fromkeys(THRESHOLDS))  # no single threshold: each class has its own
        if thresholds and align_name in thresholds:
            pooled_decisions, averaged_decisions, class_decisions = threshold_metrics(
                outputs, aligned, thresholds[align_name], classes
            )
            pooled.update(pooled_decisions)
            averaged.update(averaged_decisions)
            for name in classes:
                per_class[align_name][name].update(class_decisions[name])
        for protocol, metrics in zip(PROTOCOLS, (pooled, averaged)):
            rows.append({"method": method, "align": align_name, "protocol": protocol, **metrics})
    scores = {name: image_scores(outputs, everything, name != "none") for name in aligners}
    defects = np.array([s.defect for s in outputs.samples])
    results = {"rows": rows, "per_class": per_class}
    oracle = oracle_scores(outputs, class_score_stats)
    if oracle is not None:
        scores[ORACLE] = oracle
        results["oracle"] = [
            {"method": method, "align": ORACLE, "protocol": protocol, **metrics}
            for protocol, metrics in zip(PROTOCOLS, image_only_metrics(oracle, outputs.labels, class_names))
        ]
    results["per_product"] = {
        name: per_product_decisions(values, outputs.labels, class_names, (thresholds or {}).get(name), defects)
        for name, values in scores.items()
    }
    if target_fpr is not None and thresholds:
        results["calibration_check"] = {
            name: calibration_check(scores[name], outputs.labels, class_names, threshold, target_fpr)
            for name, threshold in thresholds.items()
            if name in scores
        }
    return results


def calibration_check(
    scores: np.ndarray, labels: np.ndarray, class_names: np.ndarray, threshold: float, target_fpr: float
) -> dict:
    """How many test normals a threshold calibrated at `target_fpr` flags, pooled and per product, with the chance
    of flagging at least as many if the target held (binomial tail); "missed" where that chance is below
    SIGNIFICANCE, and "holds" when nothing is missed: otherwise the calibration images scored lower than these
    normals (on realmix's magnetic_tile with PatchCore: held-out images whose other captures stayed in the bank)."""
    from scipy.stats import binom

    def counted(normal: np.ndarray) -> dict:
        flagged = int((normal >= threshold).sum())
        chance = float(binom.sf(flagged - 1, len(normal), target_fpr)) if flagged else 1.0
        return {
            "normals": len(normal),
            "flagged": flagged,
            "fpr": flagged / len(normal),
            "p_value": chance,
            "missed": chance < SIGNIFICANCE,
        }

    normal = labels == 0
    pooled = counted(scores[normal]) if normal.any() else None
    products = {str(name): counted(scores[normal & (class_names == name)]) for name in sorted(set(class_names[normal]))}
    return {
        "target_fpr": target_fpr,
        "threshold": float(threshold),
        "holds": not any(block and block["missed"] for block in [pooled, *products.values()]),
        "pooled": pooled,
        "products": products,
    }


def oracle_scores(outputs: EvalOutputs, class_score_stats: dict | None) -> np.ndarray | None:
    """Image scores aligned by the class-aware oracle, or None without statistics for every test class."""
    alignment = oracle_alignment(class_score_stats or {}, list(outputs.class_names))
    if alignment is None:
        return None
    u, gamma = alignment
    return align(torch.from_numpy(outputs.base_scores), u, (gamma - u).clamp(min=1e-12)).numpy()


def image_only_metrics(scores: np.ndarray, labels: np.ndarray, class_names: np.ndarray) -> tuple[dict, dict]:
    """(pooled, mean over classes) rows with the image metrics of `scores` and None for every pixel metric."""
    rows = []
    groups = [[np.arange(len(labels))], [np.flatnonzero(class_names == name) for name in sorted(set(class_names))]]
    for indices in groups:
        found = [_safe(binary_metrics, scores[index], labels[index]) for index in indices]
        row = dict.fromkeys(METRICS + THRESHOLDS)
        for key, source in (("i_auroc", "auroc"), ("i_ap", "ap"), ("i_f1max", "f1max")):
            row[key] = _mean([m[source] if m else None for m in found])
        rows.append(row)
    return rows[0], rows[1]


def per_product_decisions(
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: np.ndarray,
    threshold: float | None,
    defects: np.ndarray | None = None,
) -> dict:
    """Each product's I-AUROC, median normal score, and FPR and recall at ONE pooled threshold: the calibrated one
    when given, else the threshold at REFERENCE_FPR of the pooled test normals (an after-the-fact reference).
    With `defects` (each image's defect type), each product also gets "defects": per defect type its image count,
    I-AUROC against the product's normals and recall at that threshold, which says what the detector misses.

    "normals_aligned_i_auroc" is the mean of the products' I-AUROC weighted by their anomalous images: the pooled
    I-AUROC of any alignment that puts every product's normal scores on one distribution (each anomaly then
    ranks against all normals as against its own product's). It, not the plain per-product mean, is the figure
    to hold a pooled I-AUROC against: the pooled ranking weighs products by their anomalies, so a hard product
    with many defects pulls it down however well the products are aligned. "ceiling_i_auroc" is the most any
    per-product rescaling of these scores could reach, the test labels known (`pooled_auroc_ceiling`): what lies
    between it and the per-product figures no aligner can close, only a better ranking inside the products.
    """
    source = "calibrated"
    if threshold is None:
        threshold, source = (
            threshold_at_fpr(scores[labels == 0], REFERENCE_FPR, new_images=False),
            f"{REFERENCE_FPR:.0%} FPR on test normals",
        )
    products, weighted, anomalies = {}, 0.0, 0
    for name in sorted(set(class_names)):
        index = class_names == name
        normal = scores[index & (labels == 0)]
        decisions = decision_metrics(scores[index], labels[index], threshold)
        ranking = _safe(binary_metrics, scores[index], labels[index])
        products[name] = {
            "i_auroc": ranking["auroc"] if ranking else None,
            "median_normal_score": float(np.median(normal)) if normal.size else None,
            "fpr": decisions["fpr"],
            "recall": decisions["recall"],
        }
        if defects is not None:
            products[name]["defects"] = _per_defect(scores, labels, index, defects, threshold)
        if ranking:
            count = int((labels[index] == 1).sum())
            weighted, anomalies = weighted + count * ranking["auroc"], anomalies + count
    return {
        "threshold": float(threshold),
        "threshold_source": source,
        "normals_aligned_i_auroc": weighted / anomalies if anomalies else None,
        "ceiling_i_auroc": pooled_auroc_ceiling(scores, labels, class_names),
        "products": products,
    }


def _per_defect(scores: np.ndarray, labels: np.ndarray, product: np.ndarray, defects: np.ndarray, threshold) -> dict:
    """{defect type: {"n", "i_auroc" against the product's normals, "recall" at `threshold`}} of one product."""
    normal = scores[product & (labels == 0)]
    found = {}
    for defect in sorted(set(defects[product & (labels == 1)])):
        anomalous = scores[product & (labels == 1) & (defects == defect)]
        both = np.concatenate([normal, anomalous])
        ranking = _safe(binary_metrics, both, np.r_[np.zeros(len(normal), int), np.ones(len(anomalous), int)])
        found[str(defect)] = {
            "n": len(anomalous),
            "i_auroc": ranking["auroc"] if ranking else None,
            "recall": float((anomalous >= threshold).mean()),
        }
    return found


def format_calibration_check(results: dict) -> list[str]:
    """One warning per calibrated threshold that the test normals contradict (empty when all hold)."""
    lines = []
    for name, check in results.get("calibration_check", {}).items():
        blocks = [("all products", check["pooled"]), *check["products"].items()]
        missed = ", ".join(
            f"{label} {percent(block['fpr'])}% ({block['flagged']} of {block['normals']})"
            for label, block in blocks
            if block and block["missed"]
        )
        if missed:
            lines.append(
                f"warning ({name}): the threshold calibrated at {percent(check['target_fpr'])}% FPR flags more test "
                f"normals than chance allows (p < {SIGNIFICANCE}): {missed}. The calibration images scored lower "
                "than these normals (repeated captures of parts that stay in training? test normals unlike the "
                "training ones?); calibrate on normals of other parts: cada calibrate RUN --normal DIR"
            )
    return lines


def percent(value: float | None, missing: str = "-") -> str:
    """A rate in [0, 1] as a percentage with one decimal, `missing` for None (text and HTML reports)."""
    return missing if value is None else f"{100 * value:.1f}"


def format_per_product(results: dict) -> str:
    """Per product and alignment: median normal score, FPR and recall (percent) at one pooled threshold."""
    lines = []
    for name, block in results.get("per_product", {}).items():
        lines.append(
            f"  {name} (threshold {block['threshold']:.4g}, {block['threshold_source']}; pooled I-AUROC with "
            f"every product's normals aligned: {percent(block['normals_aligned_i_auroc'])}, at most "
            f"{percent(block['ceiling_i_auroc'])} with any per-product rescaling):"
        )
        for product, values in block["products"].items():
            median = "-" if values["median_normal_score"] is None else f"{values['median_normal_score']:.3g}"
            rates = " ".join(f"{key}={percent(values[key])}" for key in ("i_auroc", "fpr", "recall"))
            lines.append(f"    {product:<16} median normal {median:>8}  {rates}")
            if len(values.get("defects", {})) > 1:  # one type would repeat the product's line
                lines.append(
                    "      by defect (n, i_auroc/recall): "
                    + ", ".join(
                        f"{defect} ({d['n']}) {percent(d['i_auroc'])}/{percent(d['recall'])}"
                        for defect, d in values["defects"].items()
                    )
                )
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The rows (and the oracle's, when present) as an aligned text table, metrics in percent."""
    header = ["method", "align", "protocol", *HEADERS]
    lines = [
        [row["method"], row["align"], row["protocol"]]
        + ["-" if row.get(key) is None or math.isnan(row[key]) else f"{100 * row[key]:.1f}" for key in METRICS]
        for row in results["rows"] + results.get("oracle", [])
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(  # noqa: E731 - a one-line formatter
        str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def format_decisions(results: dict) -> str:
    """Decisions at the stored threshold: pooled and per-class-mean FPR, recall, precision, F1, FPR range."""
    lines = [f"{'align':<11} {'protocol':<17} {'FPR':>6} {'recall':>7} {'prec.':>6} {'F1':>6}  per-class FPR"]
    for row in results["rows"]:
        if row.get("fpr") is None and row.get("recall") is None:
            continue
        lines.append(
            f"{row['align']:<11} {row['protocol']:<17} {percent(row['fpr']):>6} {percent(row['recall']):>7} "
            f"{percent(row['precision']):>6} {percent(row['f1']):>6}  "
            f"{percent(row['class_fpr_min'])}-{percent(row['class_fpr_max'])} (std {percent(row['class_fpr_std'])})"
        )
    return "\n".join(lines)


def format_per_class(results: dict) -> str:
    """One line per aligner and class, metrics in percent ("-": undefined)."""
    lines = []
    for align_name, classes in results["per_class"].items():
        for name, metrics in classes.items():
            cells = " ".join(f"{key}={percent(metrics.get(key))}" for key in METRICS)
            lines.append(f"  {align_name:<6} {name:<16} {cells}")
    return "\n".join(lines)
