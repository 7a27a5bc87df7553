"""Prediction on anonymous images: no class names, no layout, one threshold.

Writes DIR/predictions.csv (path,score,anomalous) and DIR/predictions.json, and optionally a heatmap overlay
and a binary mask per image (every file written atomically; file names that are not valid UTF-8 are written with
backslash escapes). Images are streamed in batches, so memory does not grow with the folder. Under
torchrun the batches are shared out over the processes (each writes its own overlays and masks) and rank 0
writes the CSV and JSON of all of them, in file order.
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from cada.data.dataset import iterate_batches
from cada.data.folder import image_files
from cada.data.mvtec import Sample
from cada.engine.distributed import batch_shard, is_main, world_size
from cada.files import atomic_write, printable

# Overlays colour aligned maps on one fixed scale for every image: 0 is the predicted normal mean of the
# image's product, 1 its normal maximum; values at or above HEATMAP_MAX are full red. A normal image looks calm.
HEATMAP_MAX = 2.0

# (uint8 batch B x 3 x S x S) -> (aligned image scores B, aligned maps B x S x S[, {column: B values}]): the
# optional third item adds per-image columns to the CSV and JSON (the knn aligner's unfamiliar-product signal).
Scorer = Callable[[torch.Tensor], tuple]


def colour_map(values: np.ndarray) -> np.ndarray:
    """Aligned map values -> RGB uint8 on the fixed scale [0, HEATMAP_MAX] (matplotlib's 'jet')."""
    from matplotlib import colormaps

    scaled = np.clip(values / HEATMAP_MAX, 0.0, 1.0)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, aligned_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heatmap blended over the image (both H x W, uint8 RGB out)."""
    return (image * (1 - alpha) + colour_map(aligned_map) * alpha).astype(np.uint8)


def _output_name(path: Path, used: set[str]) -> str:
    """A file name per input image, unique even when two folders hold files of the same name."""
    name, counter = path.stem, 1
    while name in used:
        counter += 1
        name = f"{path.stem}_{counter}"
    used.add(name)
    return name


def predict_paths(scorer: Scorer, image_size: int, threshold: float | None, paths, out: str | Path,
                  overlays: bool = False, masks: bool = False, batch_size: int = 16, progress: bool = True,
                  description: dict | None = None) -> dict:
    """Score every image under `paths`; write the CSV, the JSON and (optionally) overlays and masks to `out`."""
    files = image_files(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if masks and threshold is None:
        raise ValueError("binary masks need a threshold: calibrate the run first (cada calibrate)")
    for wanted, folder in ((overlays, "overlays"), (masks, "masks")):
        if wanted:
            (out / folder).mkdir(exist_ok=True)
    # Output names are fixed over all files up front, so every process names its images as one process would.
    used: set[str] = set()
    names = [_output_name(path, used) for path in files] if overlays or masks else []
    positions = batch_shard(len(files), batch_size) if world_size() > 1 else list(range(len(files)))
    samples = [Sample(files[i], 0, "") for i in positions]
    rows = []
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, tqdm(total=len(files), desc="predicting",
                                                                disable=not (progress and is_main())) as bar:
        warnings.simplefilter("always")
        # No image cache: production images are seen once, caching them would only fill the disk.
        for batch in iterate_batches(samples, image_size, batch_size, cache_dir=None):
            scores, maps, *extra = scorer(batch["image"])
            columns = extra[0] if extra else {}
            for position, local in enumerate(batch["index"].tolist()):
                index = positions[local]
                path, score = files[index], float(scores[position])
                row = {"path": printable(path), "score": score,
                       "anomalous": None if threshold is None else bool(score >= threshold),
                       **{name: values[position].item() for name, values in columns.items()}}
                if overlays or masks:
                    name = names[index]
                    aligned_map = maps[position].numpy()
                    if overlays:
                        image = batch["image"][position].permute(1, 2, 0).numpy()
                        _write_png(out / "overlays" / f"{name}.png", overlay(image, aligned_map))
                    if masks:
                        _write_png(out / "masks" / f"{name}.png", (aligned_map >= threshold).astype(np.uint8) * 255)
                rows.append((index, row))
            bar.update((len(batch["index"]) + len(batch["errors"])) * world_size())
    # A bad file is skipped, not fatal: it is listed in the JSON with the reason.
    skipped = [printable(str(w.message).removeprefix("skipped: ")) for w in caught
               if str(w.message).startswith("skipped:")]
    for warning in caught:
        if not str(warning.message).startswith("skipped:"):
            warnings.warn(warning.message, warning.category)
    seconds = time.perf_counter() - started
    if world_size() > 1:  # every process scored its batches; rank 0 writes them all, in file order
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, (rows, skipped, seconds))
        rows = [row for part in gathered for row in part[0]]
        skipped = [message for part in gathered for message in part[1]]
        seconds = max(part[2] for part in gathered)
    rows = [row for _, row in sorted(rows, key=lambda item: item[0])]
    summary = {"threshold": threshold, "n_images": len(rows), "n_anomalous": sum(bool(r["anomalous"]) for r in rows),
               "skipped": skipped, "seconds": round(seconds, 2),
               "images_per_second": round(len(rows) / seconds, 2) if seconds else None, **(description or {})}
    if world_size() > 1:
        summary["processes"] = world_size()
    if not is_main():
        return summary
    if rows and "unfamiliar" in rows[0]:
        summary["n_unfamiliar"] = sum(bool(r["unfamiliar"]) for r in rows)
    extra = [name for name in (rows[0] if rows else {}) if name not in ("path", "score", "anomalous")]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["path", "score", "anomalous", *extra])
    for row in rows:
        writer.writerow([row["path"], f"{row['score']:.6f}", "" if row["anomalous"] is None else int(row["anomalous"]),
                         *(int(row[name]) if isinstance(row[name], bool) else f"{row[name]:.6f}" for name in extra)])
    atomic_write(out / "predictions.csv", table.getvalue())
    atomic_write(out / "predictions.json", json.dumps({**summary, "predictions": rows}, indent=2) + "\n")
    return summary


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def detector_scorer(detector) -> Scorer:
    """Aligned scores and maps; with an aligner that keeps training descriptors (knn), also each image's distance to
    the nearest training image and whether it lies beyond the training set's reference level ("unfamiliar")."""
    def score(images: torch.Tensor) -> tuple:
        result = detector.infer(images)
        distance = detector.aligner.nearest_distance(result.align_features)
        if distance is None:
            return result.aligned_scores, result.aligned_maps
        return result.aligned_scores, result.aligned_maps, {
            "nearest_distance": distance, "unfamiliar": distance > detector.aligner.reference_distance}

    return score
