"""The MVTec AD folder layout.

ROOT/<class>/train/good/*.png, ROOT/<class>/test/<defect>/*.png,
ROOT/<class>/ground_truth/<defect>/<name>_mask.png (no masks for test/good).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image. `class_name` is for evaluation and class-aware variants only; the detector never sees it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    class_name: str
    defect: str = NORMAL
    mask_path: Path | None = None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(image: Path, mask_dir: Path) -> Path | None:
    for candidate in (mask_dir / f"{image.stem}_mask{image.suffix}", mask_dir / f"{image.stem}_mask.png", mask_dir / image.name):
        if candidate.is_file():
            return candidate
    return None


def class_folders(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))
    if not classes:
        raise FileNotFoundError(
            f"{root} holds no MVTec AD class folders (expected {root}/<class>/train/good and {root}/<class>/test/<defect>)"
        )
    return classes


def mvtec_samples(root: str | Path, split: str, classes: list[str] | None = None) -> list[Sample]:
    """All samples of `split` ('train' or 'test') over every class folder of `root`, sorted by class and path."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folders = class_folders(root)
    if classes is not None:
        missing = set(classes) - {f.name for f in folders}
        if missing:
            raise FileNotFoundError(f"classes {sorted(missing)} not found under {root}")
        folders = [f for f in folders if f.name in classes]
    samples: list[Sample] = []
    for folder in folders:
        split_dir = folder / split
        if split == "train":
            found = [Sample(p, 0, folder.name) for p in _images(split_dir / NORMAL)] if (split_dir / NORMAL).is_dir() else []
            if not found:
                raise ValueError(f"class {folder.name!r} has no training images in {split_dir / NORMAL}")
        else:
            found = []
            defect_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
            for defect_dir in defect_dirs:
                is_normal = defect_dir.name == NORMAL
                for image in _images(defect_dir):
                    mask = None if is_normal else _mask_for(image, folder / "ground_truth" / defect_dir.name)
                    found.append(Sample(image, int(not is_normal), folder.name, defect_dir.name, mask))
            if not found:
                warnings.warn(f"class {folder.name!r} has no test images in {split_dir}; it is left out of evaluation")
        samples.extend(found)
    return samples
