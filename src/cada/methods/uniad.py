"""UniAD: feature reconstruction by a neighbour-masked transformer.

A frozen EfficientNet gives four stages (strides 2, 4, 8, 16); each is resized bilinearly to the stride-16
grid and the four are concatenated (272 channels for B4, 192 for Lite0). A transformer rebuilds these
tokens; where it fails (L2 distance per position), the image is anomalous. Two things keep it from simply
copying its input (the "identity shortcut"): no token may attend to its own 7x7 neighbourhood, so it must
be predicted from farther context, and in training the input is jittered with noise while the target stays
the clean feature. The aligner reads the concatenated encoder features at the grid (B x C x S/16 x S/16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cada.backbones import create_encoder
from cada.config import BaseTraining
from cada.engine import FeatureSource, Trainer, shard_of, world_size
from cada.engine.loop import LossOf
from cada.methods.base import BaseMethod, MethodOutput
from cada.registry import METHODS

NEIGHBOURHOOD = 7
JITTER_SCALE = 20.0  # noise std per token = JITTER_SCALE * ||token|| / channels (UniAD's feature jitter)


def neighbour_mask(grid: int, window: int) -> torch.Tensor:
    """(grid², grid²) bool, True where attention is forbidden: the window x window square around each token."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    half = window // 2
    return ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)


def _feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; position embedding added to queries and keys (DETR style)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.feed_forward = _feed_forward(dim, hidden, dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(x + pos, x + pos, x, attn_mask=mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.feed_forward(x))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer with its own learned queries; it reads the previous layer's output (UniAD)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, tokens: int):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(tokens, dim))
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.feed_forward = _feed_forward(dim, hidden, dropout)

    def forward(self, previous: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(previous.shape[0], -1, -1)
        attended = self.self_attention(q + pos, q + pos, q, attn_mask=mask, need_weights=False)[0]
        q = self.norm1(q + self.dropout1(attended))
        attended = self.cross_attention(q + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        q = self.norm2(q + self.dropout2(attended))
        return self.norm3(q + self.feed_forward(q))


class NeighbourMaskedTransformer(nn.Module):
    """Tokens (B x grid² x channels) -> rebuilt tokens; every attention excludes each token's neighbourhood."""

    def __init__(
        self,
        channels: int,
        grid: int,
        dim: int = 256,
        heads: int = 8,
        layers: int = 4,
        hidden: int = 1024,
        dropout: float = 0.1,
        window: int = NEIGHBOURHOOD,
    ):
        super().__init__()
        self.input_projection = nn.Linear(channels, dim)
        # Learned 2-D position embedding: half the channels from the column, half from the row.
        self.col_embed = nn.Parameter(torch.rand(grid, dim // 2))
        self.row_embed = nn.Parameter(torch.rand(grid, dim - dim // 2))
        self.encoder_layers = nn.ModuleList([EncoderLayer(dim, heads, hidden, dropout) for _ in range(layers)])
        self.decoder_layers = nn.ModuleList(
            [DecoderLayer(dim, heads, hidden, dropout, grid * grid) for _ in range(layers)]
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.output_projection = nn.Linear(dim, channels)
        for parameter in [*self.encoder_layers.parameters(), *self.decoder_layers.parameters()]:
            if parameter.dim() > 1:  # as UniAD (and DETR) initialise their transformer
                nn.init.xavier_uniform_(parameter)
        # Derived from grid and window, so not saved with the weights.
        self.register_buffer("mask", neighbour_mask(grid, window), persistent=False)
        self.grid, self.window = grid, window

    def position_embedding(self) -> torch.Tensor:
        grid = self.grid
        cols = self.col_embed.unsqueeze(0).expand(grid, -1, -1)
        rows = self.row_embed.unsqueeze(1).expand(-1, grid, -1)
        return torch.cat([cols, rows], dim=-1).reshape(1, grid * grid, -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.position_embedding()
        x = self.input_projection(tokens)
        for layer in self.encoder_layers:
            x = layer(x, pos, self.mask)
        for layer in self.decoder_layers:
            x = layer(x, pos, self.mask)
        return self.output_projection(self.decoder_norm(x))


def fitting_window(grid: int, window: int = NEIGHBOURHOOD) -> int:
    """The neighbourhood, shrunk to the largest odd size below the grid on tiny grids (e.g. 64 px: 4x4 tokens),
    where a 7x7 window would forbid every token and leave attention nothing to read."""
    return min(window, grid - 1 if grid % 2 == 0 else grid - 2)


def _paper(settings) -> None:  # paper Sec. 4.2; EfficientNet-B4 as in UniAD, regressor trained 20,000 iterations
    settings.backbone, settings.image_size = "efficientnet_b4", 224
    settings.base = BaseTraining(iters=50_000, batch_size=64, lr=3e-4, weight_decay=1e-4)
    settings.aligner.iters = 20_000


@METHODS.register("uniad", presets={"paper": _paper})
class UniAD(BaseMethod):
    score_scale = 10.0  # the paper's smooth-L1 alpha for UniAD: its L2 distances are on a larger scale

    def __init__(self, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="uniad")
        self.grid = image_size // self.encoder.strides[-1]
        self.align_channels = sum(self.encoder.channels)
        self.transformer = NeighbourMaskedTransformer(self.align_channels, self.grid, window=fitting_window(self.grid))
        self.image_size = image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The four stages resized to the stride-16 grid and concatenated: B x C x grid x grid."""
        size = (self.grid, self.grid)
        stages = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in self.encoder(x)]
        return torch.cat(stages, dim=1)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        tokens = features.flatten(2).transpose(1, 2)  # B x grid² x C
        return self.transformer(tokens).transpose(1, 2).reshape(features.shape)

    def forward(self, x: torch.Tensor) -> MethodOutput:
        features = self.features(x)
        distance = (self.reconstruct(features) - features).pow(2).sum(dim=1, keepdim=True).sqrt()
        anomaly_map = F.interpolate(distance, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput(anomaly_map.squeeze(1), features)

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """Train the transformer to rebuild clean features from jittered ones (MSE); the encoder stays frozen."""
        features = FeatureSource(lambda x: [self.features(x)], images, settings.batch_size, cache_gib, trainer)

        def loss_of(iteration: int, batch: torch.Tensor) -> torch.Tensor:
            clean = features[batch][0]
            # The noise of the whole global batch from the shared generator, this process's slice of it
            # (identical to the single-process draw when there is one process).
            noise = torch.randn((clean.shape[0] * world_size(), *clean.shape[1:]), generator=generator)
            noise = shard_of(noise).to(clean.device)
            scale = clean.norm(dim=1, keepdim=True) / clean.shape[1] * JITTER_SCALE
            return F.mse_loss(self.reconstruct(clean + noise * scale), clean)

        return [{"params": list(self.transformer.parameters())}], loss_of
