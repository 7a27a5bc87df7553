"""Prediction on anonymous images: no class names, no layout, one threshold.

Writes DIR/predictions.csv (path,score,anomalous,width,height, and the scorer's columns) and
DIR/predictions.json, and optionally a heatmap overlay and a binary mask per image, at the image's own size by
default (every file written atomically; file names that are not valid UTF-8 are written with backslash
escapes). Images are streamed in batches, so memory does not grow with the folder. Under torchrun the batches
are shared out over the processes (each writes its own overlays and masks) and rank 0 writes the CSV and JSON
of all of them, in file order.
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from cada.data.dataset import BadImageError, image_size_of, iterate_batches, rgb_array
from cada.data.folder import image_files
from cada.data.mvtec import Sample
from cada.data.resize import crop_to_content
from cada.engine.distributed import batch_shard, is_main, world_size
from cada.files import atomic_write, printable
from cada.operating_point import choose_threshold, without_scores

# Overlays colour aligned maps on one fixed scale for every image: 0 is the predicted normal mean of the
# image's product, 1 its normal maximum; values at or above HEATMAP_MAX are full red. A normal image looks calm.
HEATMAP_MAX = 2.0
# Overlays and masks at each image's own size (the map upsampled bilinearly), or at the model's input size.
OUTPUT_SIZES = ("original", "model")

# (uint8 batch B x 3 x S x S) -> (aligned image scores B, aligned maps B x S x S[, {column: B values}]): the
# optional third item adds per-image columns to the CSV and JSON (u and spread; knn-distance's score offset; the knn
# aligners' unfamiliar-product signal).
Scorer = Callable[[torch.Tensor], tuple]
EXPORTED_SUFFIXES = (".onnx", ".xml")  # cada export: ONNX, OpenVINO IR


def colour_map(values: np.ndarray) -> np.ndarray:
    """Aligned map values -> RGB uint8 on the fixed scale [0, HEATMAP_MAX] (matplotlib's 'jet')."""
    from matplotlib import colormaps

    scaled = np.clip(values / HEATMAP_MAX, 0.0, 1.0)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, aligned_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heatmap blended over the image (both H x W, uint8 RGB out)."""
    return (image * (1 - alpha) + colour_map(aligned_map) * alpha).astype(np.uint8)


def _source_positions(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear resampling as torch's F.interpolate(align_corners=False): for each output position, the two input
    positions it reads and the weight of the second."""
    source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    first = source.floor().long().clamp(max=size_in - 1)
    return first, (first + 1).clamp(max=size_in - 1), (source - first).float()


def upsampled_strips(aligned_map: torch.Tensor, height: int, width: int, rows: int = 256):
    """(first row, rows x width float32 array) strips of `aligned_map` (h x w) upsampled bilinearly to height x
    width, as evaluate's --pixel-resolution original upsamples (F.interpolate, align_corners=False), without ever
    holding the full-size float map: memory stays small for camera-sized images."""
    aligned_map = aligned_map.float()
    y0, y1, wy = _source_positions(aligned_map.shape[0], height)
    x0, x1, wx = _source_positions(aligned_map.shape[1], width)
    across = aligned_map[:, x0] * (1 - wx) + aligned_map[:, x1] * wx  # h x width
    for start in range(0, height, rows):
        part = slice(start, start + rows)
        weight = wy[part, None]
        yield start, (across[y0[part]] * (1 - weight) + across[y1[part]] * weight).numpy()


def full_size_outputs(
    aligned_map: torch.Tensor, height: int, width: int, image: np.ndarray | None = None, threshold: float | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(overlay over `image` (H x W x 3 uint8) or None, binary mask (0/255) at `threshold` or None), at the image's
    own height x width: the map upsampled bilinearly, strip by strip."""
    picture = None if image is None else np.empty((height, width, 3), np.uint8)
    mask = None if threshold is None else np.empty((height, width), np.uint8)
    for start, strip in upsampled_strips(aligned_map, height, width):
        rows = slice(start, start + len(strip))
        if picture is not None and image is not None:
            picture[rows] = overlay(image[rows], strip)
        if mask is not None:
            mask[rows] = (strip >= threshold).astype(np.uint8) * 255
    return picture, mask


def _output_name(path: Path, used: set[str]) -> str:
    """A file name per input image, unique even when two folders hold files of the same name."""
    name, counter = path.stem, 1
    while name in used:
        counter += 1
        name = f"{path.stem}_{counter}"
    used.add(name)
    return name


def predict_paths(
    scorer: Scorer,
    image_size: int,
    threshold: float | None,
    paths,
    out: str | Path,
    overlays: bool = False,
    masks: bool = False,
    batch_size: int = 16,
    progress: bool = True,
    description: dict | None = None,
    output_size: str = "original",
    resize: str = "squash",
) -> dict:
    """Score every image under `paths` (fitted to image_size by `resize`, the run's; see cada.data.resize); write
    the CSV, the JSON and (optionally) overlays and masks to `out`.

    Rows carry each image's own width and height. Overlays and masks are written at that size (output_size
    "original": the map, cropped to the image, upsampled bilinearly; the overlay over the image as read) or at the
    model's (`model`: over the model's input, a letterbox's padding included)."""
    if output_size not in OUTPUT_SIZES:
        raise ValueError(f"output size must be one of {', '.join(OUTPUT_SIZES)}, got {output_size!r}")
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
    numbered: list[tuple[int, dict]] = []  # (file index, row): processes' rows are merged in file order
    started = time.perf_counter()
    with (
        warnings.catch_warnings(record=True) as caught,
        tqdm(total=len(files), desc="predicting", disable=not (progress and is_main())) as bar,
    ):
        warnings.simplefilter("always")
        # No image cache: production images are seen once, caching them would only fill the disk.
        for batch in iterate_batches(samples, image_size, batch_size, cache_dir=None, resize=resize):
            scores, maps, *extra = scorer(batch["image"])
            columns = extra[0] if extra else {}
            for position, local in enumerate(batch["index"].tolist()):
                index = positions[local]
                path, score = files[index], float(scores[position])
                try:  # the image as read (overlays at its own size), else its size from the header alone
                    original = rgb_array(path) if overlays and output_size == "original" else None
                    width, height = image_size_of(path) if original is None else original.shape[1::-1]
                except BadImageError as error:  # changed since it was scored: skipped as unreadable files are
                    warnings.warn(f"skipped: {error}")
                    continue
                row = {
                    "path": printable(path),
                    "score": score,
                    "anomalous": None if threshold is None else bool(score >= threshold),
                    "width": width,
                    "height": height,
                    **{name: values[position].item() for name, values in columns.items()},
                }
                if overlays or masks:
                    name = names[index]
                    if output_size == "original":
                        picture, mask = full_size_outputs(
                            crop_to_content(maps[position], width, height, resize),
                            height,
                            width,
                            original,
                            threshold if masks else None,
                        )
                    else:
                        aligned_map = maps[position].numpy()
                        image = batch["image"][position].permute(1, 2, 0).numpy()
                        picture = overlay(image, aligned_map) if overlays else None
                        mask = (aligned_map >= threshold).astype(np.uint8) * 255 if masks else None
                    if picture is not None:
                        _write_png(out / "overlays" / f"{name}.png", picture)
                    if mask is not None:
                        _write_png(out / "masks" / f"{name}.png", mask)
                numbered.append((index, row))
            bar.update((len(batch["index"]) + len(batch["errors"])) * world_size())
    # A bad file is skipped, not fatal: it is listed in the JSON with the reason.
    skipped = [
        printable(str(w.message).removeprefix("skipped: ")) for w in caught if str(w.message).startswith("skipped:")
    ]
    for warning in caught:
        if not str(warning.message).startswith("skipped:"):
            warnings.warn(warning.message, warning.category)
    seconds = time.perf_counter() - started
    if world_size() > 1:  # every process scored its batches; rank 0 writes them all, in file order
        gathered: list[tuple] = [()] * world_size()
        dist.all_gather_object(gathered, (numbered, skipped, seconds))
        numbered = [row for part in gathered for row in part[0]]
        skipped = [message for part in gathered for message in part[1]]
        seconds = max(part[2] for part in gathered)
    rows = [row for _, row in sorted(numbered, key=lambda item: item[0])]
    summary = {
        "threshold": threshold,
        "output_size": output_size,
        "n_images": len(rows),
        "n_anomalous": sum(bool(r["anomalous"]) for r in rows),
        "skipped": skipped,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(rows) / seconds, 2) if seconds else None,
        **(description or {}),
    }
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
        writer.writerow(
            [
                spreadsheet_safe(row["path"]),
                f"{row['score']:.6f}",
                "" if row["anomalous"] is None else int(row["anomalous"]),
                *(int(row[name]) if isinstance(row[name], (bool, int)) else f"{row[name]:.6f}" for name in extra),
            ]
        )
    atomic_write(out / "predictions.csv", table.getvalue())
    atomic_write(out / "predictions.json", json.dumps({**summary, "predictions": rows}, indent=2) + "\n")
    return summary


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a CSV cell as a formula


def spreadsheet_safe(text: str) -> str:
    """A CSV text cell that a spreadsheet shows as text: a leading character of FORMULA_STARTS would make it a
    formula (CSV injection), so such a cell gets a leading apostrophe, as OWASP advises. JSON keeps the text as is."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def detector_scorer(detector) -> Scorer:
    """Aligned scores and maps, with each image's predicted normal statistics: u (the normal mean of its base map)
    and spread (gamma - u, its normal maximum above the mean, floored as the alignment uses it; aligned = (base - u)
    / spread, and the score adds `score_offset` where the aligner has one: knn-distance). With an aligner that keeps
    training descriptors (the knn aligners), also each image's distance to the nearest training image and whether
    it lies beyond the training set's reference level ("unfamiliar"). A tiled run's are combined from its tiles
    (cada.tiles)."""
    from cada.inference import image_distances

    def score(images: torch.Tensor) -> tuple:
        result = detector.infer(images)
        columns = {"u": result.u, "spread": result.spread}
        if result.offset is not None:
            columns["score_offset"] = result.offset
        distance = image_distances(detector.aligner, result.align_features.to(detector.device), detector.settings)
        if distance is not None:
            distance = distance.cpu()
            columns.update(nearest_distance=distance, unfamiliar=distance > detector.aligner.unfamiliar_reference)
        return result.aligned_scores, result.aligned_maps, columns

    return score


@dataclass
class LoadedModel:
    """What prediction needs of a run folder or an exported model, at the operating point chosen."""

    scorer: Scorer
    image_size: int  # the side of the square the scorer takes (with tiles, the square they are cut from)
    resize: str  # how images fit that square (cada.data.resize)
    threshold: float | None
    threshold_source: str | None  # where the threshold comes from, in words (None: no threshold)
    calibration: dict | None  # as stored, without the calibration scores
    description: dict  # what predictions.json says of the model
    settings: dict | None = None


def load_model(
    target: str | Path,
    fpr: float | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> LoadedModel:
    """A run folder or an exported model (.onnx, or OpenVINO's .xml), ready to score on `device` (a run also in
    `precision`; see cada.engine.device); the threshold is the stored one, or the one at `fpr` over the stored
    calibration scores, or `threshold` (see cada.operating_point)."""
    target = Path(target)
    if target.suffix in EXPORTED_SUFFIXES:
        from cada.runtime import exported_scorer, sidecar_path
        from cada.threshold import check_calibration

        scorer, image_size, stored, description = exported_scorer(target, device)
        sidecar = json.loads(sidecar_path(target).read_text())  # read and checked by exported_scorer
        try:
            calibration = check_calibration(sidecar.get("calibration"))
        except ValueError as error:
            raise ValueError(f"{sidecar_path(target)}: {error}") from None
        if stored is not None and (calibration is None or calibration["threshold"] != stored):
            # the sidecar's threshold is the one that decides (as ever): set by hand, it is said so
            calibration = {
                **(calibration or {}),
                "threshold": stored,
                "how": "given",
                "source": "its threshold field, set by hand",
            }
        settings, where = sidecar.get("settings"), f"in {sidecar_path(target).name}"
        resize = (settings or {}).get("resize", "squash")
    else:
        from cada.api import Detector

        detector = Detector.load(target, device=device, precision=precision)
        scorer, image_size, calibration = detector_scorer(detector), detector.settings.input_size, detector.calibration
        resize = detector.settings.resize
        description = {"run": str(target)}
        reference = detector.aligner.unfamiliar_reference
        if reference is not None:  # an aligner with an unfamiliar-product signal (knn)
            description["unfamiliar_reference_distance"] = reference
        settings, where = detector.settings.to_dict(), "in the run"
    chosen, source = choose_threshold(calibration, fpr, threshold, where)
    description["threshold_source"] = source
    return LoadedModel(scorer, image_size, resize, chosen, source, without_scores(calibration), description, settings)
