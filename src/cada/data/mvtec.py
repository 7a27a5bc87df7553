"""The MVTec AD folder layout, and MVTec AD-like trees with any class and defect names.

ROOT/<class>/train/good/*.png, ROOT/<class>/test/<defect>/*.png,
ROOT/<class>/ground_truth/<defect>/<name>_mask.png (no masks for test/good).

Masks are matched by file stem, with or without the `_mask` suffix and in any image format, so VisA
trees converted to this layout (JPG images, PNG masks of the same stem) read as they are. BTAD is the
same tree with `ok` for `good` (see btad.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from cada.data.layouts import Layout
from cada.registry import LAYOUTS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image. `class_name` is for evaluation and class-aware variants only; the detector never sees it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    class_name: str
    defect: str = NORMAL
    mask_path: Path | None = None


def is_image_file(path: Path) -> bool:
    # Hidden files are skipped: macOS leaves `._name.png` resource forks that carry an image suffix.
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder` (not in subfolders), sorted; [] when it does not exist."""
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def mask_index(folders: list[Path]) -> dict[str, Path]:
    """Image stem -> mask file, over the images in `folders`: `000.png` and `000_mask.png` both serve `000.*`.

    One listing per folder instead of probing every suffix for every image; a `_mask` file wins a tie.
    """
    index: dict[str, Path] = {}
    for folder in folders:
        for mask in list_images(folder):
            stem = mask.stem
            if stem.endswith(MASK_SUFFIX):
                index[stem[: -len(MASK_SUFFIX)]] = mask
            else:
                index.setdefault(stem, mask)
    return index


def warn_orphan_masks(masks: list[Path], image_folder: Path | str) -> None:
    """Masks that no test image matches: a misnamed image or mask would otherwise drop out of evaluation unseen."""
    if masks:
        warnings.warn(
            f"{len(masks)} mask file(s) match no image in {image_folder} (e.g. {sorted(masks)[0]}): they are "
            "ignored; an image is matched by its file name without the suffix (000.png <- 000_mask.png)"
        )


def class_folders(root: str | Path, normal: str = NORMAL, layout: str = "MVTec AD") -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))
    if not classes:
        raise FileNotFoundError(
            f"{root} holds no {layout} class folders (expected {root}/<class>/train/{normal} and "
            f"{root}/<class>/test/<defect>)"
        )
    return classes


def mvtec_samples(
    root: str | Path, split: str, classes: list[str] | None = None, *, normal: str = NORMAL, layout: str = "MVTec AD"
) -> list[Sample]:
    """All samples of `split` ('train' or 'test') over every class folder of `root`, sorted by class and path.

    `normal` names the folder of normal images (`good` in MVTec AD, `ok` in BTAD); every other folder under
    test/ is a defect type whose masks are in ground_truth/<defect>.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folders = class_folders(root, normal, layout)
    if classes is not None:
        missing = set(classes) - {f.name for f in folders}
        if missing:
            raise FileNotFoundError(f"classes {sorted(missing)} not found under {root}")
        folders = [f for f in folders if f.name in classes]
    samples: list[Sample] = []
    for folder in folders:
        split_dir = folder / split
        if split == "train":
            found = [Sample(p, 0, folder.name, normal) for p in list_images(split_dir / normal)]
            if not found:
                raise ValueError(f"class {folder.name!r} has no training images in {split_dir / normal}")
        else:
            found = []
            defect_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
            for defect_dir in defect_dirs:
                is_normal = defect_dir.name == normal
                masks = {} if is_normal else mask_index([folder / "ground_truth" / defect_dir.name])
                for image in list_images(defect_dir):
                    found.append(
                        Sample(image, int(not is_normal), folder.name, defect_dir.name, masks.pop(image.stem, None))
                    )
                warn_orphan_masks(list(masks.values()), defect_dir)
            truth = folder / "ground_truth"
            for mask_dir in sorted(d for d in truth.iterdir() if d.is_dir()) if truth.is_dir() else []:
                if not (split_dir / mask_dir.name).is_dir():
                    warn_orphan_masks(list_images(mask_dir), split_dir / mask_dir.name)
            if not found:
                warnings.warn(f"class {folder.name!r} has no test images in {split_dir}; it is left out of evaluation")
        samples.extend(found)
    return samples


@LAYOUTS.register("mvtec")
class MVTecLayout(Layout):
    looked_for = "MVTec AD (<class>/train/good, <class>/test/<defect>)"

    def recognises_class(self, folder: Path) -> bool:
        return (folder / "train").is_dir() or (folder / "test").is_dir()

    def samples(self, root: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
        return mvtec_samples(root, split, classes)
