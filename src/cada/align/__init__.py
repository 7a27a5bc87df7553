"""Aligners: per-image normal-score statistics (u, gamma) that put every class on one score scale.

Each aligner registers itself (`@ALIGNERS.register(name, trained=...)`, see `cada.registry`); `trained` aligners
have weights to train and need aligner.iters >= 1. Importing this package imports no base method."""

from __future__ import annotations

from cada.align.base import Aligner, NoAlign
from cada.align.cada import CADA, CADAScore, CADASigma
from cada.align.class_aware import ClassAware, ClassifierAligner
from cada.align.knn import KNNAligner, KNNDistance, KNNLevel
from cada.lookalike import MAX, MEAN, SCORE, STD
from cada.registry import ALIGNERS


def create_aligner(name: str, channels: int, settings) -> Aligner:
    """The aligner `name` for align features of `channels` channels; `settings` is the AlignTraining block."""
    return ALIGNERS[name].cls(channels, settings)


__all__ = [
    "ALIGNERS",
    "Aligner",
    "CADA",
    "CADAScore",
    "CADASigma",
    "ClassAware",
    "ClassifierAligner",
    "KNNAligner",
    "KNNDistance",
    "KNNLevel",
    "NoAlign",
    "create_aligner",
    "MEAN",
    "MAX",
    "STD",
    "SCORE",
]
