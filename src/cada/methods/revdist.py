"""Reverse Distillation (RD4AD, the paper's "RevDist").

A frozen encoder gives three feature scales; a bottleneck fuses them into one compact embedding (OCBE);
a reverse decoder rebuilds the three scales from it. Where the decoder fails to rebuild the encoder's
features (1 - cosine per position), the image is anomalous.

Widths follow the encoder: with wide_resnet50_2 (256, 512, 1024 channels) this is exactly the RD4AD
bottleneck and decoder; with any other encoder the same structure is built from its stage shapes.
The decoder uses GELU instead of ReLU, as the paper does for stability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cada.backbones import create_encoder, inference_layout
from cada.engine import FeatureSource, Trainer
from cada.engine.loop import LossOf
from cada.methods.base import BaseMethod, MethodOutput
from cada.registry import METHODS

EXPANSION = 4
WIDTH_FACTOR = 2  # wide ResNet: the 3x3 conv is twice as wide as a plain bottleneck's


def _bn_act(channels: int, act: type[nn.Module]) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), act()]


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1). With `upsample`, the stride-2 step is a 2x2 transposed conv instead."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1, upsample: bool = False, act=nn.ReLU):
        super().__init__()
        width, out_channels = planes * WIDTH_FACTOR, planes * EXPANSION
        middle: nn.Module
        if stride == 2 and upsample:
            middle = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            middle = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            *_bn_act(width, act),
            middle,
            *_bn_act(width, act),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            projection: nn.Module
            if stride == 2 and upsample:
                projection = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
            else:
                projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += self.shortcut(x)  # in place: a batch's largest tensors are not allocated twice (6% of inference)
        return self.act(out)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, upsample: bool, act) -> nn.Sequential:
    planes = out_channels // EXPANSION
    layers = [Bottleneck(in_channels, planes, stride, upsample, act)]
    layers += [Bottleneck(out_channels, planes, 1, upsample, act) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _down(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), *_bn_act(out_channels, nn.ReLU)]


class OneClassBottleneck(nn.Module):
    """Multi-scale fusion + one-class embedding (RD4AD's OCBE): three scales -> one map at half the smallest."""

    def __init__(self, channels: tuple[int, int, int], blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.from_first = nn.Sequential(*_down(c1, c2), *_down(c2, c3))
        self.from_second = nn.Sequential(*_down(c2, c3))
        self.embed = _stage(3 * c3, 2 * c3, blocks, stride=2, upsample=False, act=nn.ReLU)
        self.out_channels = 2 * c3

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        first, second, third = (inference_layout(scale) for scale in features)  # the decoder inherits the layout
        return self.embed(torch.cat([self.from_first(first), self.from_second(second), third], dim=1))


class ReverseDecoder(nn.Module):
    """The encoder mirrored: each stage upsamples x2 and ends with the channels of the matching encoder scale."""

    def __init__(self, channels: tuple[int, int, int], blocks: tuple[int, int, int] = (3, 4, 6)):
        super().__init__()
        c1, c2, c3 = channels
        self.stages = nn.ModuleList(
            [
                _stage(2 * c3, c3, blocks[0], stride=2, upsample=True, act=nn.GELU),
                _stage(c3, c2, blocks[1], stride=2, upsample=True, act=nn.GELU),
                _stage(c2, c1, blocks[2], stride=2, upsample=True, act=nn.GELU),
            ]
        )

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]  # finest first, like the encoder


def cosine_distance_map(encoded: list[torch.Tensor], decoded: list[torch.Tensor], size: int) -> torch.Tensor:
    """Mean over scales of the per-position 1 - cosine, bilinearly upsampled to size x size."""
    return mean_upsampled(scale_distances(encoded, decoded), size)


def scale_distances(encoded: list[torch.Tensor], decoded: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale, the per-position 1 - cosine (B x h x w, at that scale's resolution)."""
    return [1 - F.cosine_similarity(target, rebuilt, dim=1) for target, rebuilt in zip(encoded, decoded)]


def mean_upsampled(distances: list[torch.Tensor], size: int) -> torch.Tensor:
    """The mean of per-scale maps (B x h x w each), each bilinearly upsampled to size x size first."""
    upsampled = [
        F.interpolate(distance.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        for distance in distances
    ]
    return (sum(upsampled[1:], upsampled[0]) / len(distances)).squeeze(1)


def flattened_cosine_loss(encoded: list[torch.Tensor], decoded: list[torch.Tensor]) -> torch.Tensor:
    """Per scale, 1 - cosine between whole flattened feature maps, averaged over the batch, summed over scales."""
    loss = encoded[0].new_zeros(())
    for target, rebuilt in zip(encoded, decoded):
        loss = loss + (1 - F.cosine_similarity(target.flatten(1), rebuilt.flatten(1), dim=1)).mean()
    return loss


def _cpu(settings) -> None:
    # Lite2: on 6 products mixed it lifted the per-product I-AUROC of each weaker product, for more CPU time
    # (docs/results/base-methods.md); the other methods keep Lite0, not measured with Lite2.
    settings.backbone = "efficientnet_lite2"


@METHODS.register("revdist", presets={"cpu": _cpu})
class RevDist(BaseMethod):
    score_scale = 0.1
    int8_modules = ("encoder", "decoder")

    def __init__(self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="revdist")
        channels = tuple(self.encoder.channels)
        self.bottleneck = OneClassBottleneck(channels)
        self.decoder = ReverseDecoder(channels)
        self.image_size = image_size
        self.align_channels = self.bottleneck.out_channels

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bottleneck.parameters()) + list(self.decoder.parameters())

    def reconstruct(self, encoded: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embedding = self.bottleneck(encoded)
        return embedding, self.decoder(embedding)

    def forward(self, x: torch.Tensor) -> MethodOutput:
        encoded = self.encoder(x)
        embedding, decoded = self.reconstruct(encoded)
        return MethodOutput(cosine_distance_map(encoded, decoded, x.shape[-1]), embedding)

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """Train bottleneck and decoder on normal images (uint8 N x 3 x S x S); the encoder stays frozen."""
        features = FeatureSource(self.encoder, images, settings.batch_size, cache_gib, trainer)

        def loss_of(iteration: int, batch: torch.Tensor) -> torch.Tensor:
            encoded = features[batch]
            return flattened_cosine_loss(encoded, self.reconstruct(encoded)[1])

        return [{"params": self.trainable_parameters()}], loss_of
