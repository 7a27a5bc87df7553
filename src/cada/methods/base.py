"""What every base method provides (see docs/architecture.md, "Base method"), and the training template."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from cada.engine import Trainer, make_optimizer
from cada.engine.loop import LossOf


class MethodOutput(NamedTuple):
    anomaly_map: torch.Tensor  # B x H x W at input resolution, unsmoothed, larger = more anomalous
    align_features: torch.Tensor  # B x C x h x w, what the aligner reads


class BaseMethod(nn.Module):
    """A base anomaly detector. `score_scale` is the smooth-L1 alpha that fits its map's scale.

    A method is built as `Method(backbone, image_size, pretrained=..., weights_path=..., **options)`, `options`
    being its registered options block (see `cada.methods.register`). It supplies `objective` (what to optimise
    and the loss of a batch); `fit` runs it in the engine's loop, then `build` (PatchCore: its memory bank, and no
    objective).
    """

    name: str = ""
    score_scale: float = 0.1
    align_channels: int  # channels of `align_features`, so an aligner can be built before training
    # What `cada export --int8` quantises (module attributes); what feeds the aligners' neighbour search stays
    # float32: quantising RevDist's bottleneck moved the look-alike neighbours (docs/results/export-and-speed.md).
    int8_modules: tuple[str, ...] = ("encoder",)

    def fit(
        self,
        images: torch.Tensor,
        settings,
        generator: torch.Generator,
        progress: bool = True,
        cache_gib: float = 4.0,
        trainer: Trainer | None = None,
    ) -> list[float]:
        """Train on normal uint8 images (N x 3 x S x S) with the base-training `settings` (a resolved BaseTraining),
        then `build` what the method keeps beyond weights; returns the loss per iteration (empty: no gradient
        training). Frozen features are kept in memory when they fit in `cache_gib`. `trainer` carries the run's
        checkpoints (default: none, progress bars per `progress`)."""
        trainer = trainer or Trainer(progress=progress)
        losses: list[float] = []
        if self.trains_by_gradient():
            groups, loss_of = self.objective(images, settings, generator, cache_gib, trainer)
            optimizer = make_optimizer(groups, settings)
            self.train()
            losses = trainer.run(self.name, len(images), settings, optimizer, generator, loss_of, module=self)
        self.eval()
        self.build(images, settings, generator, trainer)
        return losses

    def build(self, images: torch.Tensor, settings, generator: torch.Generator, trainer: Trainer) -> None:
        """What the method keeps beyond trained weights, made from the normal training images after any gradient
        training (PatchCore: its memory bank). Nothing by default."""

    @classmethod
    def trains_by_gradient(cls) -> bool:
        """False for a method without an `objective` (PatchCore: `build` makes its bank in one pass): it has no
        iterations, losses or learning rates to report."""
        return cls.objective is not BaseMethod.objective

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """(optimiser parameter groups, loss of a batch): a group without "lr" gets settings.lr; the loss is
        `loss_of(iteration, batch_indices)` over `images`, drawing any randomness from `generator`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> MethodOutput:
        raise NotImplementedError

    def training_output(self, x: torch.Tensor, image_index: torch.Tensor) -> MethodOutput:
        """The output on `fit`'s own training images of these indices (B), from which the aligner's targets come.
        A method that has memorised its training images (PatchCore's bank) leaves each image's own share out,
        so that these maps look like those of unseen normal images."""
        return self(x)
