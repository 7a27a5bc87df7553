"""One entry point for every folder layout: `find_samples(root, split, format)`.

auto recognises, in this order: VisA (split_csv/1cls.csv, or <object>/Data/Images), BTAD (<class>/train/ok
or <class>/test/ko), MVTec AD and MVTec AD-like trees (<class>/train, <class>/test). A root that is itself
one class folder (e.g. mvtec/bottle) is read as that one class. `folder` reads a root of normal images
for training (recursively); labelled test folders go through `folder_samples`.
"""

from __future__ import annotations

from pathlib import Path

from cada.data.btad import btad_samples, looks_like_btad_class
from cada.data.folder import FOLDER_CLASS, image_files
from cada.data.mvtec import NORMAL, Sample, mvtec_samples
from cada.data.visa import SPLIT_FILE, looks_like_visa_object, visa_samples

FORMATS = ("auto", "mvtec", "visa", "btad", "folder")
_READERS = {"visa": visa_samples, "btad": btad_samples, "mvtec": mvtec_samples}
_LOOKED_FOR = (
    f"VisA ({SPLIT_FILE} or <object>/Data/Images), BTAD (<class>/train/ok, <class>/test/ko), "
    "MVTec AD (<class>/train/good, <class>/test/<defect>)"
)


def _class_layout(folder: Path) -> str | None:
    """The layout `folder` has as one class folder, if any."""
    if looks_like_visa_object(folder):
        return "visa"
    if looks_like_btad_class(folder):
        return "btad"
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return "mvtec"
    return None


def _subfolders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def detect_format(root: str | Path) -> str:
    """'visa', 'btad' or 'mvtec' by looking at the folder names only; an error says what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / SPLIT_FILE).is_file():
        return "visa"
    layouts = {_class_layout(d) for d in _subfolders(root)} - {None} or {_class_layout(root)} - {None}
    for layout in _READERS:  # VisA and BTAD class folders also have MVTec-like parts: most specific first
        if layout in layouts:
            return layout
    raise FileNotFoundError(
        f"cannot tell the layout of {root}: looked for {_LOOKED_FOR}. For other data use --format folder "
        "with folders of normal (and anomalous) images"
    )


def _is_one_class(root: Path) -> bool:
    return _class_layout(root) is not None and not any(_class_layout(d) for d in _subfolders(root))


def find_samples(
    root: str | Path, split: str, format: str = "auto", classes: list[str] | None = None
) -> tuple[list[Sample], str]:
    """The samples of `split` ('train' or 'test') under `root`, and the format read ('auto' resolved).

    format: 'auto', 'mvtec', 'visa', 'btad' or 'folder' (all images under `root` as normal training images,
    one class; for a labelled test set use `folder_samples`).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if format == "folder":
        if split == "test":
            raise ValueError(
                "the folder format has no labels in a single root: give folders of normal and of "
                "anomalous images (and masks) instead (folder_samples; --normal/--anomalous/--masks)"
            )
        return [Sample(p, 0, FOLDER_CLASS, NORMAL) for p in image_files(root)], format
    chosen = detect_format(root) if format == "auto" else format
    if root.is_dir() and _is_one_class(root):  # e.g. mvtec_ad/bottle: read its parent, this class only
        if classes is not None and classes != [root.name]:
            raise ValueError(f"{root} is the single class {root.name!r}; classes {classes} are not in it")
        return _READERS[chosen](root.parent, split, [root.name]), chosen
    return _READERS[chosen](root, split, classes), chosen
