"""The two protocols and the results table.

absolute-unified: every test image of every class pooled, one ROC/PR curve (one threshold for all).
model-unified: the same metrics per class, then averaged over classes (each class its own threshold).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cada.data.dataset import iterate_batches
from cada.data.mvtec import Sample
from cada.metrics import binary_metrics
from cada.scoring import align

PROTOCOLS = ("absolute-unified", "model-unified")
METRICS = ("i_auroc", "i_ap", "p_auroc", "p_ap")


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

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @property
    def class_names(self) -> np.ndarray:
        return np.array([s.class_name for s in self.samples])


def collect(detector, samples: list[Sample], batch_size: int = 16, progress: bool = True) -> EvalOutputs:
    """Run the detector over the test samples once; base and aligned results both come from this pass."""
    kept, maps, masks, has_mask, scores, u, spread = [], [], [], [], [], [], []
    batches = iterate_batches(samples, detector.settings.image_size, batch_size)
    with tqdm(total=len(samples), desc="evaluating", disable=not progress, leave=False) as bar:
        for batch in batches:
            result = detector.infer(batch["image"])
            kept.extend(samples[i] for i in batch["index"].tolist())
            maps.append(result.maps)
            masks.append(batch["mask"])
            has_mask.append(batch["has_mask"])
            scores.append(result.base_scores)
            u.append(result.u)
            spread.append(result.spread)
            bar.update(len(batch["index"]))
    if not kept:
        raise ValueError("no test image could be read")
    outputs = EvalOutputs(
        kept, torch.cat(maps), torch.cat(masks), torch.cat(has_mask).numpy(),
        *(torch.cat(values).numpy() for values in (scores, u, spread)),
    )
    missing = [s.path for s, ok in zip(kept, outputs.has_mask) if not ok]
    if missing:
        warnings.warn(
            f"{len(missing)} anomalous test image(s) have no mask file (e.g. {missing[0]}); they count for the "
            "image metrics and are left out of the pixel metrics"
        )
    return outputs


def _safe(metric, scores, labels) -> dict | None:
    """Metrics when both kinds of sample are present, else None (e.g. a class with no anomalous test image)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    return metric(scores, labels)


def subset_metrics(outputs: EvalOutputs, index: np.ndarray, aligned: bool) -> dict:
    """I-AUROC, I-AP, P-AUROC, P-AP of the images at `index`, with base or aligned scores."""
    u, spread = torch.from_numpy(outputs.u[index]), torch.from_numpy(outputs.spread[index])
    image_scores = torch.from_numpy(outputs.base_scores[index])
    if aligned:
        image_scores = align(image_scores, u, spread)
    row = dict.fromkeys(METRICS)
    image = _safe(binary_metrics, image_scores.numpy(), outputs.labels[index])
    if image:
        row["i_auroc"], row["i_ap"] = image["auroc"], image["ap"]
    pixel_index = index[outputs.has_mask[index]]
    maps = outputs.maps[pixel_index]
    if aligned:
        maps = align(maps, u[outputs.has_mask[index]], spread[outputs.has_mask[index]])
    pixel = _safe(binary_metrics, maps.numpy(), outputs.masks[pixel_index].numpy())
    if pixel:
        row["p_auroc"], row["p_ap"] = pixel["auroc"], pixel["ap"]
    return row


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def results_table(outputs: EvalOutputs, method: str, aligners: tuple[str, ...]) -> dict:
    """{"rows": [...], "per_class": {align: {class: metrics}}} for the base ("none") and each aligner."""
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
        for protocol, metrics in zip(PROTOCOLS, (pooled, averaged)):
            rows.append({"method": method, "align": align_name, "protocol": protocol, **metrics})
    return {"rows": rows, "per_class": per_class}


def format_table(results: dict) -> str:
    """The rows as an aligned text table, metrics in percent."""
    header = ["method", "align", "protocol", "I-AUROC", "I-AP", "P-AUROC", "P-AP"]
    lines = [[row["method"], row["align"], row["protocol"]] + [
        "-" if row[key] is None or math.isnan(row[key]) else f"{100 * row[key]:.1f}" for key in METRICS
    ] for row in results["rows"]]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(  # noqa: E731 - a one-line formatter
        str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def format_per_class(results: dict) -> str:
    lines = []
    for align_name, classes in results["per_class"].items():
        for name, metrics in classes.items():
            cells = " ".join(
                f"{key}={'-' if metrics[key] is None else f'{100 * metrics[key]:.1f}'}" for key in METRICS
            )
            lines.append(f"  {align_name:<6} {name:<16} {cells}")
    return "\n".join(lines)
