"""Data without a standard layout: folders of normal and anomalous images, and unlabeled images to predict on.

The labelled folders are read flat (subfolders are not searched, so a mask folder kept inside an image
folder is not mistaken for images); unlabeled inputs for prediction are searched recursively.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from cada.data.layouts import Layout
from cada.data.mvtec import (
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    NORMAL,
    Sample,
    is_image_file,
    list_images,
    mask_index,
    warn_orphan_masks,
)
from cada.registry import LAYOUTS

FOLDER_CLASS = "folder"

Paths = str | Path | Iterable[str | Path]


def _as_list(paths: Paths) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def image_files(paths: Paths) -> list[Path]:
    """The image files among `paths`: files as given, folders searched recursively; sorted, each once.

    Hidden files and folders are skipped. A named file is taken whatever its suffix (the loader reports it
    if it is not an image).
    """
    found: set[Path] = set()
    for path in _as_list(paths):
        if path.is_dir():
            found.update(
                p
                for p in path.rglob("*")
                if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.add(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    if not found:
        searched = ", ".join(map(str, _as_list(paths)))
        raise ValueError(f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in {searched}")
    return sorted(found)


def _folder_images(folder: Path, skip_masks: bool) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = [p for p in list_images(folder) if not (skip_masks and p.stem.endswith(MASK_SUFFIX))]
    if not images:
        warnings.warn(f"{folder} holds no images (subfolders are not searched)")
    return images


def folder_samples(
    normal: Paths = (), anomalous: Paths = (), masks: Paths = (), class_name: str = FOLDER_CLASS
) -> list[Sample]:
    """Samples from folders of normal images and folders of anomalous images, all of one class.

    Masks are matched to anomalous images by file stem, with or without a `_mask` suffix. Give one mask
    folder for all anomalous folders, or one per anomalous folder in the same order (then two defect folders
    may hold files of the same name). An anomalous image without a mask still counts for the image metrics.
    `defect` is the anomalous folder's name.
    """
    normal, anomalous, masks = _as_list(normal), _as_list(anomalous), _as_list(masks)
    for folder in masks:
        if not folder.is_dir():
            raise FileNotFoundError(f"mask folder {folder} does not exist")
    paired = len(masks) == len(anomalous) and len(masks) > 1
    pooled = mask_index(masks)
    samples = [Sample(p, 0, class_name, NORMAL) for folder in normal for p in _folder_images(folder, folder in masks)]
    unmatched = {mask for folder in masks for mask in mask_index([folder]).values()}
    for i, folder in enumerate(anomalous):
        index = mask_index([masks[i]]) if paired else pooled
        found = [
            Sample(p, 1, class_name, folder.name, index.get(p.stem)) for p in _folder_images(folder, folder in masks)
        ]
        unmatched -= {sample.mask_path for sample in found}
        samples += found
    if unmatched:
        warn_orphan_masks(sorted(unmatched), "the anomalous folders")
    if not samples:
        raise ValueError("no images in the given folders" if normal or anomalous else "no image folders given")
    return samples


@LAYOUTS.register("folder")
class FolderLayout(Layout):
    """Every image under the root (recursively) as a normal training image of one class; never recognised by auto."""

    def samples(self, root: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
        if split == "test":
            raise ValueError(
                "the folder format has no labels in a single root: give folders of normal and of "
                "anomalous images (and masks) instead (folder_samples; --normal/--anomalous/--masks)"
            )
        return [Sample(p, 0, FOLDER_CLASS, NORMAL) for p in image_files(root)]
