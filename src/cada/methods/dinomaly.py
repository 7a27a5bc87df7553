"""Dinomaly (Guo et al., CVPR 2025): a frozen DINOv2 ViT, a noisy bottleneck and a linear-attention decoder that
rebuilds the encoder's middle blocks loosely; where it fails to (1 - cosine), the image is anomalous.

Encoder. The patch tokens after `blocks` consecutive blocks from `first_block` (DINOv2 ViT-B/14: blocks 2-9 of 12),
at stride 14; an input whose side is no multiple of 14 is resized to the nearest one (`ViTEncoder`).
Noisy bottleneck. The blocks' tokens are averaged, then an MLP (4x wide, no biases) with dropout `dropout` on its
input, hidden layer and output: in training the dropout is the noise that keeps the decoder from learning to rebuild
anything, anomalies included.
Decoder. `decoder_depth` transformer blocks whose attention is linear (ELU + 1 kernels, no softmax: attention spreads
over the whole image instead of focusing on the token itself); block i's output is matched with encoder block
`blocks - 1 - i`.
Loose reconstruction. The encoder's and the decoder's blocks are averaged in `groups` consecutive groups, and each
group pair is compared as a whole: the loss is 1 - cosine between the flattened maps, and the gradient of every
position that the decoder already rebuilds well (its 1 - cosine below the `mining_ratio` quantile, which ramps up from
0 over `mining_ramp` steps) is multiplied by `easy_factor`. Map: per group the per-position 1 - cosine, upsampled
to the input and averaged; the pipeline smooths it and takes its image score (top 1%, as the reference).

What differs from the reference: the prefix (class) token is not passed through the decoder, and training uses the
engine's AdamW with step drops rather than StableAdamW with a warm-up cosine schedule. Its weights do not exist on
this machine: the method is tested with random weights (tests/test_dinomaly.py), and its quality is unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cada.backbones import create_vit_encoder
from cada.config import BaseTraining
from cada.engine import FeatureSource, Trainer
from cada.engine.loop import LossOf
from cada.methods.base import BaseMethod, MethodOutput
from cada.methods.revdist import mean_upsampled, scale_distances
from cada.registry import METHODS


@dataclass
class DinomalySettings:
    """The encoder blocks read, the bottleneck's dropout, the decoder's depth, the groups and the hard mining."""

    first_block: int = 2
    blocks: int = 8
    dropout: float = 0.2
    decoder_depth: int = 8
    groups: int = 2
    mining_ratio: float = 0.9
    mining_ramp: int = 1000
    easy_factor: float = 0.1
    RANGES: ClassVar[dict[str, str]] = {
        "first_block": "[0, 64]",
        "blocks": "[1, 64]",
        "dropout": "[0, 1)",
        "decoder_depth": "[1, 64]",
        "groups": "[1, 64]",
        "mining_ratio": "[0, 1)",
        "mining_ramp": "[0, 1000000]",
        "easy_factor": "[0, 1]",
    }


class LinearAttention(nn.Module):
    """Softmax-free attention: out = phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)), phi = ELU + 1, per head."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        context = k.transpose(-2, -1) @ v  # B x heads x d x d: linear in the token count
        normaliser = 1 / (q * k.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True)
        out = (q @ context) * normaliser
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attention = LinearAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def noisy_bottleneck(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(dim, 4 * dim, bias=False),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(4 * dim, dim, bias=False),
        nn.Dropout(dropout),
    )


def grouped(maps: list[torch.Tensor], groups: int) -> list[torch.Tensor]:
    """The mean of each of `groups` consecutive runs of `maps` (as equal as the count allows)."""
    return [torch.stack(part).mean(dim=0) for part in _split(maps, groups)]


def _split(items: list, groups: int) -> list[list]:
    size, extra = divmod(len(items), groups)
    bounds = [i * size + min(i, extra) for i in range(groups + 1)]
    return [items[start:end] for start, end in zip(bounds, bounds[1:])]


def loose_cosine_loss(
    encoded: list[torch.Tensor], decoded: list[torch.Tensor], ratio: float, easy_factor: float
) -> torch.Tensor:
    """Mean over the group pairs of 1 - cosine between whole flattened maps; the gradient of the positions whose
    1 - cosine lies below the `ratio` quantile (the well rebuilt ones) is multiplied by `easy_factor`."""
    loss = decoded[0].new_zeros(())
    for target, rebuilt in zip(encoded, decoded):
        target = target.detach()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(target, rebuilt, dim=1)  # B x h x w
            keep = max(1, int(distance.numel() * (1 - ratio)))
            easy = (distance < distance.flatten().topk(keep).values[-1]).unsqueeze(1)
        if rebuilt.requires_grad:
            rebuilt.register_hook(lambda grad, easy=easy: torch.where(easy, grad * easy_factor, grad))
        loss = loss + (1 - F.cosine_similarity(target.flatten(1), rebuilt.flatten(1), dim=1)).mean()
    return loss / len(encoded)


def _paper(settings) -> None:  # the reference's schedule: ViT-B/14 at 448 px, 10,000 steps of 16, AdamW 2e-3, wd 1e-4
    settings.backbone, settings.image_size = "vit_base_patch14_dinov2", 448
    settings.base = BaseTraining(iters=10_000, batch_size=16, lr=2e-3, weight_decay=1e-4)


def _cpu(settings) -> None:
    settings.backbone, settings.image_size = "vit_small_patch14_dinov2", 224  # 16 x 16 tokens


@METHODS.register("dinomaly", options=DinomalySettings, presets={"paper": _paper, "cpu": _cpu})
class Dinomaly(BaseMethod):
    score_scale = 0.1  # a 1 - cosine map, as RevDist's

    def __init__(
        self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None, **options
    ):
        super().__init__()
        self.options = DinomalySettings(**options)
        blocks = tuple(range(self.options.first_block, self.options.first_block + self.options.blocks))
        self.encoder = create_vit_encoder(backbone, blocks, pretrained=pretrained, weights_path=weights_path)
        dim = self.encoder.channels[0]
        self.bottleneck = noisy_bottleneck(dim, self.options.dropout)
        heads = max(1, dim // 64)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(self.options.decoder_depth))
        self.image_size = image_size
        self.align_channels = dim

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bottleneck.parameters()) + list(self.decoder.parameters())

    def reconstruct(self, encoded: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(encoder groups, decoder groups), each B x C x h x w."""
        fused = torch.stack(encoded).mean(dim=0)
        batch, dim, height, width = fused.shape
        x = self.bottleneck(fused.flatten(2).transpose(1, 2))
        rebuilt = []
        for block in self.decoder:
            x = block(x)
            rebuilt.append(x.transpose(1, 2).reshape(batch, dim, height, width))
        groups = self.options.groups
        return grouped(encoded, groups), grouped(rebuilt[::-1], groups)

    def forward(self, x: torch.Tensor) -> MethodOutput:
        encoded = self.encoder(x)
        targets, rebuilt = self.reconstruct(encoded)
        anomaly_map = mean_upsampled(scale_distances(targets, rebuilt), x.shape[-1])
        return MethodOutput(anomaly_map, torch.stack(encoded).mean(dim=0))

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """Train the bottleneck and the decoder on normal images (uint8 N x 3 x S x S); the ViT stays frozen."""
        features = FeatureSource(self.encoder, images, settings.batch_size, cache_gib, trainer)
        options = self.options

        def loss_of(iteration: int, batch: torch.Tensor) -> torch.Tensor:
            ramp = min(1.0, iteration / options.mining_ramp) if options.mining_ramp else 1.0
            targets, rebuilt = self.reconstruct(features[batch])
            return loose_cosine_loss(targets, rebuilt, options.mining_ratio * ramp, options.easy_factor)

        return [{"params": self.trainable_parameters()}], loss_of
