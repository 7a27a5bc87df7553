"""Folder layouts, one registry: `find_samples(root, split, format)` is the entry point for a data root.

A layout is one class registered with `@LAYOUTS.register(name)` in its own file (mvtec.py, btad.py, visa.py,
folder.py; a plugin the same way): how to recognise it and how to read a split of it (`Layout`). `auto`
recognises them most specific first (VisA by its split file or <object>/Data/Images, then BTAD by
<class>/train/ok or <class>/test/ko, then MVTec AD and MVTec AD-like trees by <class>/train, <class>/test). A root
that is itself one class folder (e.g. mvtec/bottle) is read as that one class. `folder` reads a root of normal
images for training (recursively); labelled test folders go through `folder_samples`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cada.registry import LAYOUTS

if TYPE_CHECKING:
    from cada.data.mvtec import Sample


class Layout:
    """What a layout says about a data root. `looked_for` describes it in the error when no layout is recognised;
    `specificity` orders recognition (layouts whose folders other layouts also match go first); a layout that
    `auto` never picks (`folder`) recognises nothing."""

    name: str = ""
    looked_for: str = ""
    specificity: int = 0

    def recognises_root(self, root: Path) -> bool:
        """Whether `root` is a data root of this layout by what lies at the root itself (VisA's split file)."""
        return False

    def recognises_class(self, folder: Path) -> bool:
        """Whether `folder` is one class folder of this layout."""
        return False

    def samples(self, root: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
        """The samples of `split` ('train' or 'test') of the classes under `root` (all, or `classes`)."""
        raise NotImplementedError


def formats() -> tuple[str, ...]:
    """What --format takes: auto, and every registered layout."""
    return ("auto", *LAYOUTS.names())


def _layout(name: str) -> Layout:
    return LAYOUTS[name].cls()


def _recognising() -> list[Layout]:
    """The layouts auto recognises, the most specific first."""
    layouts = [_layout(name) for name in LAYOUTS.names()]
    return sorted((layout for layout in layouts if layout.looked_for), key=lambda layout: -layout.specificity)


def _class_layout(folder: Path) -> str | None:
    """The layout `folder` has as one class folder, if any."""
    return next((layout.name for layout in _recognising() if layout.recognises_class(folder)), None)


def _subfolders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def detect_format(root: str | Path) -> str:
    """The layout of `root` by looking at the folder names only; an error says what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    layouts = _recognising()
    for layout in layouts:
        if layout.recognises_root(root):
            return layout.name
    found = {_class_layout(d) for d in _subfolders(root)} - {None} or {_class_layout(root)} - {None}
    for layout in layouts:  # most specific first: VisA and BTAD class folders also have MVTec-like parts
        if layout.name in found:
            return layout.name
    raise FileNotFoundError(
        f"cannot tell the layout of {root}: looked for {', '.join(layout.looked_for for layout in layouts)}. For "
        "other data use --format folder with folders of normal (and anomalous) images"
    )


def _is_one_class(root: Path) -> bool:
    return _class_layout(root) is not None and not any(_class_layout(d) for d in _subfolders(root))


def find_samples(
    root: str | Path, split: str, format: str = "auto", classes: list[str] | None = None
) -> tuple[list[Sample], str]:
    """The samples of `split` ('train' or 'test') under `root`, and the format read ('auto' resolved).

    format: 'auto' or a registered layout (`formats()`): 'mvtec', 'visa', 'btad', or 'folder' (all images under
    `root` as normal training images, one class; for a labelled test set use `folder_samples`).
    """
    if format not in formats():
        raise ValueError(f"format must be one of {', '.join(formats())}, got {format!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    chosen = detect_format(root) if format == "auto" else format
    layout = _layout(chosen)
    if layout.looked_for and root.is_dir() and _is_one_class(root):  # e.g. mvtec_ad/bottle: this class only
        if classes is not None and classes != [root.name]:
            raise ValueError(f"{root} is the single class {root.name!r}; classes {classes} are not in it")
        return layout.samples(root.parent, split, [root.name]), chosen
    return layout.samples(root, split, classes), chosen
