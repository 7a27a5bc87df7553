"""ReContrast: reverse distillation in which the encoder adapts too, contrasted against its frozen copy.

Two copies of one ImageNet encoder read the image: a frozen one and a trainable one. Both feature sets go
through one shared bottleneck and one decoder (RevDist's, GELU); the decoder has two 1x1-conv output heads
per scale, and the pairing is crossed: head 0 of the decoding of the trainable encoder rebuilds the frozen
features, head 1 of the decoding of the frozen encoder rebuilds the trainable features. The map is the
mean over the 6 (pair, scale) of the per-position 1 - cosine. The aligner reads the bottleneck output of
the frozen encoder's branch (the RevDist counterpart; it does not drift with the trainable encoder).

The trainable encoder stays in eval mode (its BatchNorm keeps ImageNet statistics), as ReContrast does in
the multi-class setting: `Encoder.train` never leaves eval mode, so a deep copy with gradients on is exactly that.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cada.backbones import create_encoder
from cada.config import BaseTraining
from cada.data.dataset import normalize
from cada.engine import FeatureSource, Trainer
from cada.engine.loop import LossOf
from cada.methods.base import BaseMethod, MethodOutput
from cada.methods.revdist import OneClassBottleneck, ReverseDecoder, cosine_distance_map
from cada.registry import METHODS

# Hard mining: the threshold mean + alpha * std of the per-position distance; alpha ramps linearly from
# ALPHA_START to ALPHA_END over the first RAMP_FRACTION of the iterations (all positions count at first).
ALPHA_START, ALPHA_END, RAMP_FRACTION = -3.0, 1.0, 0.1
EASY_GRADIENT_FACTOR = 0.0  # ReContrast drops the gradient of easy positions entirely


def hard_mining_alpha(iteration: int, iters: int) -> float:
    ramp = max(1.0, RAMP_FRACTION * iters)
    return min(ALPHA_START + (ALPHA_END - ALPHA_START) * iteration / ramp, ALPHA_END)


def _scale_gradient(gradient: torch.Tensor, easy: torch.Tensor, factor: float) -> torch.Tensor:
    return torch.where(easy, gradient * factor, gradient)


def hard_mined_cosine_loss(
    targets: list[torch.Tensor], rebuilt: list[torch.Tensor], alpha: float, factor: float = EASY_GRADIENT_FACTOR
) -> torch.Tensor:
    """ReContrast's global cosine loss with hard mining, summed over the pairs.

    The loss is RevDist's flattened cosine distance (targets detached). Positions whose distance
    d = 1 - cos is below mean(d) + alpha * std(d) (over the whole batch) are "easy": a hook multiplies
    their gradient by `factor`, so training concentrates on what is still rebuilt badly.
    """
    loss = rebuilt[0].new_zeros(())
    for target, student in zip(targets, rebuilt):
        target = target.detach()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(target, student, dim=1).unsqueeze(1)
            easy = distance < distance.mean() + alpha * distance.std()
        loss = loss + (1 - F.cosine_similarity(target.flatten(1), student.flatten(1), dim=1)).mean()
        if student.requires_grad:
            student.register_hook(partial(_scale_gradient, easy=easy, factor=factor))
    return loss


def _paper(settings) -> None:  # the reference's multi-class optimisation
    settings.base = BaseTraining(eps=1e-10, amsgrad=True, encoder_lr=1e-5, lr_drop_at=0.8)


@METHODS.register("recontrast", presets={"paper": _paper})
class ReContrast(BaseMethod):
    score_scale = 0.1

    def __init__(self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="revdist")
        self.trainable_encoder = copy.deepcopy(self.encoder).requires_grad_(True)  # eval mode for good, see above
        channels = tuple(self.encoder.channels)
        self.bottleneck = OneClassBottleneck(channels)
        self.decoder = ReverseDecoder(channels)
        self.heads = nn.ModuleList([nn.ModuleList([nn.Conv2d(c, c, 1) for c in channels]) for _ in range(2)])
        self.image_size = image_size
        self.align_channels = self.bottleneck.out_channels

    def pairs(self, x: torch.Tensor, frozen: list[torch.Tensor] | None = None):
        """(targets, rebuilt, frozen-branch embedding); 6 pairs: frozen vs head 0, then trainable vs head 1."""
        adapted = self.trainable_encoder(x)
        if frozen is None:
            with torch.no_grad():
                frozen = self.encoder(x)
        # Both branches in one batch through the shared bottleneck and decoder (as the reference does, so
        # the BatchNorm statistics of training are those of both branches together).
        embedding = self.bottleneck([torch.cat(pair) for pair in zip(adapted, frozen)])
        halves = [d.chunk(2) for d in self.decoder(embedding)]  # (from trainable, from frozen) per scale
        heads = [cast(nn.ModuleList, branch) for branch in self.heads]
        rebuilt = [head(h[0]) for head, h in zip(heads[0], halves)]
        rebuilt += [head(h[1]) for head, h in zip(heads[1], halves)]
        return list(frozen) + [a.detach() for a in adapted], rebuilt, embedding.chunk(2)[1]

    def forward(self, x: torch.Tensor) -> MethodOutput:
        targets, rebuilt, embedding = self.pairs(x)
        return MethodOutput(cosine_distance_map(targets, rebuilt, x.shape[-1]), embedding)

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """Train bottleneck, decoder and heads (settings.lr) and the trainable encoder (settings.encoder_lr)."""
        frozen = FeatureSource(self.encoder, images, settings.batch_size, cache_gib, trainer)
        reconstruction = [*self.bottleneck.parameters(), *self.decoder.parameters(), *self.heads.parameters()]
        groups = [
            {"params": reconstruction},
            {"params": list(self.trainable_encoder.parameters()), "lr": settings.encoder_lr},
        ]

        def loss_of(iteration: int, batch: torch.Tensor) -> torch.Tensor:
            targets, rebuilt, _ = self.pairs(normalize(images[batch], trainer.device), frozen[batch])
            alpha = hard_mining_alpha(iteration, settings.iters)
            return hard_mined_cosine_loss(targets, rebuilt, alpha) / 2  # the two halves (3 scales each) averaged

        return groups, loss_of
