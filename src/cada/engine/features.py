"""Frozen-encoder features of the training images by index, for the training loops of every method."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cada.data.dataset import normalize


class FeatureSource:
    """A frozen encoder sees every image identically each time (no augmentation), so its features are computed
    once and kept when they fit in `cache_gib`; otherwise they are recomputed per batch.

    `stop_point(where)` is called between batches of the one encoding pass (a `Trainer`'s, so a signal stops it).
    """

    def __init__(
        self,
        encode,
        images: torch.Tensor,
        batch_size: int,
        cache_gib: float,
        stop_point: Callable[[str], None] | None = None,
    ):
        self.encode, self.images, self.cached = encode, images, None
        with torch.no_grad():
            probe = encode(normalize(images[:1]))
        if len(images) * sum(f.numel() * f.element_size() for f in probe) <= cache_gib * 2**30:
            chunks = []
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    if stop_point is not None:
                        stop_point("encoding the training images")
                    chunks.append(encode(normalize(images[start : start + batch_size])))
            self.cached = [torch.cat(scale) for scale in zip(*chunks)]

    def __getitem__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self.cached is not None:
            return [scale[batch] for scale in self.cached]
        with torch.no_grad():
            return self.encode(normalize(self.images[batch]))
