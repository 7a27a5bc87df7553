"""The BTAD layout (beanTech Anomaly Detection): the MVTec AD tree with `ok`/`ko` folder names.

ROOT/<class>/train/ok/*, ROOT/<class>/test/ok/*, ROOT/<class>/test/ko/*, ROOT/<class>/ground_truth/ko/*
with classes 01, 02, 03 (any names work). Images are .bmp or .png; masks are matched by file stem because
some classes pair .bmp images with .png masks.
"""

from __future__ import annotations

from pathlib import Path

from cada.data.layouts import Layout
from cada.data.mvtec import Sample, mvtec_samples
from cada.registry import LAYOUTS

NORMAL = "ok"


def btad_samples(root: str | Path, split: str, classes: list[str] | None = None) -> list[Sample]:
    """All samples of `split` ('train' or 'test'), sorted by class and path; `defect` is the folder name (ok/ko)."""
    return mvtec_samples(root, split, classes, normal=NORMAL, layout="BTAD")


@LAYOUTS.register("btad")
class BTADLayout(Layout):
    looked_for = "BTAD (<class>/train/ok, <class>/test/ko)"
    specificity = 10  # its class folders are MVTec-like too

    def recognises_class(self, folder: Path) -> bool:
        return (folder / "train" / NORMAL).is_dir() or (folder / "test" / "ko").is_dir()

    def samples(self, root: Path, split: str, classes: list[str] | None = None) -> list[Sample]:
        return btad_samples(root, split, classes)
