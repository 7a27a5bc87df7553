"""Aligners: per-image normal-score statistics (u, gamma) that put every class on one score scale."""

from __future__ import annotations

from cada.align.base import Aligner, NoAlign
from cada.align.cada import CADA


def create_aligner(name: str, channels: int, settings) -> Aligner:
    if name == "none":
        return NoAlign()
    if name == "cada":
        return CADA(channels, hidden=settings.hidden, dropout=settings.dropout)
    raise ValueError(f"unknown aligner {name!r}; available: none, cada")


__all__ = ["Aligner", "CADA", "NoAlign", "create_aligner"]
