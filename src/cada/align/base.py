"""What every aligner provides (see docs/architecture.md, "Aligner"), and the head they share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cada.engine import DrawSampler, Trainer, lr_factor
from cada.lookalike import MAX, MEAN, SpreadFloor
from cada.registry import ALIGNERS


class Aligner(SpreadFloor):
    """Predicts per-image normal-score statistics (u, gamma); the aligned map is (M - u) / spread(u, gamma), the
    spread floored by `min_spread` (SpreadFloor), which `fit` sets."""

    name: str = ""
    has_score_offset = False  # whether score_offset gives terms (an exported graph then has them as an output)
    needs_class_names = False  # only the class-aware upper-bound reference reads test-time class names

    def fit(
        self,
        features: torch.Tensor,
        image_stats: torch.Tensor,
        settings,
        generator: torch.Generator,
        class_names: list[str] | None = None,
        progress: bool = True,
        trainer: Trainer | None = None,
    ) -> list[float]:
        """features: N x C x h x w of normal training images; image_stats: N x 4 (`map_statistics`) of each map.
        `trainer` carries the run's checkpoints (default: none, progress bars per `progress`)."""
        raise NotImplementedError

    def stats(self, features: torch.Tensor, class_names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, gamma), each of shape B."""
        raise NotImplementedError

    def set_min_spread(self, image_stats: torch.Tensor, fraction: float = 0.1) -> None:
        typical = (image_stats[:, MAX] - image_stats[:, MEAN]).median().clamp(min=1e-6)
        self.min_spread.fill_(float(typical) * fraction)

    def nearest_distance(self, features: torch.Tensor) -> torch.Tensor | None:
        """B distances to the nearest training image in the aligner's descriptor, for aligners that keep one (knn);
        above `unfamiliar_reference` an image is unlike every training image: likely a product never trained on."""
        return None

    def score_offset(self, features: torch.Tensor) -> torch.Tensor | None:
        """B terms added to the aligned image scores but not to their maps, for aligners that score the image as a
        whole (knn-distance: how unlike the training images it is, which has no place in the map); else None."""
        return None

    @property
    def unfamiliar_reference(self) -> float | None:
        """The nearest_distance beyond which an image is "unfamiliar"; None for aligners without that signal."""
        return None

    # Non-tensor state (e.g. class names) goes to the run's config.json; tensors go to safetensors.
    def config_state(self) -> dict:
        return {}

    def load_config_state(self, state: dict) -> None:
        pass


@ALIGNERS.register("none")
class NoAlign(Aligner):
    """The base map as it is: u = 0, gamma = 1."""

    def __init__(self, channels: int = 0, settings=None):  # the common signature; nothing to build
        super().__init__()

    def fit(
        self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None
    ) -> list[float]:
        return []

    def stats(self, features, class_names=None):
        batch = features.shape[0]
        return features.new_zeros(batch), features.new_ones(batch)


class Head(nn.Module):
    """0-2 convs keeping the channel count, global average pooling, then 1-3 linear layers.

    Default (paper): 1 conv + 2 linear, hidden 256, dropout before each linear layer.
    """

    def __init__(
        self, channels: int, outputs: int, hidden: int = 256, dropout: float = 0.25, convs: int = 1, linears: int = 2
    ):
        super().__init__()
        self.convs = nn.Sequential(
            *[
                layer
                for _ in range(convs)
                for layer in (nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
            ]
        )
        widths = [channels] + [hidden] * (linears - 1) + [outputs]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Dropout(dropout), nn.Linear(width_in, width_out)]
            if index < linears - 1:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        layer = self.mlp[-1]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.convs(features).mean(dim=(2, 3)))


def make_head(channels: int, outputs: int, settings) -> Head:
    return Head(channels, outputs, settings.hidden, settings.dropout, settings.convs, settings.linears)


def train_head(
    head: Head,
    features: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings,
    generator: torch.Generator,
    description: str,
    trainer: Trainer,
) -> list[float]:
    """SGD on random batches of cached features (paper: lr 5e-2, momentum 0.9, wd 1e-4, batch 16).

    `loss_of(outputs, batch_indices)` gives the loss of one batch. The loop is the base methods' one
    (`Trainer.loop`): DDP and sharded batches under torch.distributed, checkpoints to resume.
    """
    factor = lr_factor(settings)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=settings.lr * factor, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    head.train()
    losses = trainer.loop(
        description,
        settings.iters,
        optimizer,
        generator,
        lambda iteration, batch: loss_of(head(features[batch]), batch),
        DrawSampler(len(features), settings.batch_size),
        settings,
        module=head,
    )
    head.eval()
    return losses
