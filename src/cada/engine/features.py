"""Frozen-encoder features of the training images by index, for the training loops of every method."""

from __future__ import annotations

import torch

from cada.data.dataset import normalize
from cada.engine.loop import Trainer


class FeatureSource:
    """A frozen encoder sees every image identically each time (no augmentation), so its features are computed
    once and kept when they fit in `cache_gib`; otherwise they are recomputed per batch.

    The images stay on the CPU; each batch is moved to the `trainer`'s device and encoded there, in its precision
    (the cache, when kept, lives on that device: `cache_gib` is device memory). The trainer's `stop_point` is
    called between batches of the one encoding pass, so a signal stops it.
    """

    def __init__(self, encode, images: torch.Tensor, batch_size: int, cache_gib: float, trainer: Trainer | None = None):
        self.encode, self.images, self.cached = encode, images, None
        self.trainer = trainer or Trainer(progress=False)
        probe = self._encode(images[:1])
        if len(images) * sum(f.numel() * f.element_size() for f in probe) <= cache_gib * 2**30:
            chunks = []
            for start in range(0, len(images), batch_size):
                self.trainer.stop_point("encoding the training images")
                chunks.append(self._encode(images[start : start + batch_size]))
            self.cached = [torch.cat(scale) for scale in zip(*chunks)]

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """In the run's precision: a bf16 cache takes half the memory."""
        with torch.no_grad(), self.trainer.autocast():
            return self.encode(normalize(images, self.trainer.device))

    def __getitem__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The features of these images, float32 (autocast casts them down again where it computes in half)."""
        if self.cached is not None:
            return [scale[batch.to(scale.device)].float() for scale in self.cached]
        return [scale.float() for scale in self._encode(self.images[batch])]
