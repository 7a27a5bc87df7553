"""Aligners: per-image normal-score statistics (u, gamma) that put every class on one score scale."""

from __future__ import annotations

from cada.align.base import MAX, MEAN, SCORE, STD, Aligner, NoAlign
from cada.align.cada import CADA, CADAScore, CADASigma
from cada.align.class_aware import ClassAware, ClassifierAligner
from cada.align.knn import KNNAligner, KNNLevel

ALIGNER_CLASSES = {cls.name: cls for cls in (CADA, CADASigma, CADAScore, ClassAware, ClassifierAligner,
                                             KNNAligner, KNNLevel)}


def create_aligner(name: str, channels: int, settings) -> Aligner:
    """`settings` is the AlignTraining block (head structure and training)."""
    if name == "none":
        return NoAlign()
    if name not in ALIGNER_CLASSES:
        raise ValueError(f"unknown aligner {name!r}; available: none, {', '.join(ALIGNER_CLASSES)}")
    return ALIGNER_CLASSES[name](channels, settings)


__all__ = ["Aligner", "CADA", "CADAScore", "CADASigma", "ClassAware", "ClassifierAligner", "KNNAligner", "KNNLevel", "NoAlign",
           "create_aligner", "MEAN", "MAX", "STD", "SCORE"]
