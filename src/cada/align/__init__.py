"""Aligners: per-image normal-score statistics (u, gamma) that put every class on one score scale."""

from __future__ import annotations

from cada.align.base import MAX, MEAN, STD, Aligner, NoAlign
from cada.align.cada import CADA, CADASigma
from cada.align.class_aware import ClassAware, ClassifierAligner

ALIGNER_CLASSES = {cls.name: cls for cls in (CADA, CADASigma, ClassAware, ClassifierAligner)}


def create_aligner(name: str, channels: int, settings) -> Aligner:
    """`settings` is the AlignTraining block (head structure and training)."""
    if name == "none":
        return NoAlign()
    if name not in ALIGNER_CLASSES:
        raise ValueError(f"unknown aligner {name!r}; available: none, {', '.join(ALIGNER_CLASSES)}")
    return ALIGNER_CLASSES[name](channels, settings)


__all__ = ["Aligner", "CADA", "CADASigma", "ClassAware", "ClassifierAligner", "NoAlign", "create_aligner",
           "MEAN", "MAX", "STD"]
