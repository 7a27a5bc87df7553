"""Small pieces the method tests share."""

import torch

from cada.config import Settings, preset

SQUARE = (slice(None), slice(20, 36), slice(20, 36))  # where `paste_square` puts its defect (64 px images)


def tiny_preset(method: str, iters: int = 3) -> Settings:
    """The cpu preset of `method` at 64 px: `iters` base steps of batch 4, 5 regressor steps of batch 4."""
    settings = preset("cpu", method)
    settings.image_size = 64
    settings.base.iters, settings.base.batch_size = iters, 4
    settings.aligner.iters, settings.aligner.batch_size = 5, 4
    return settings


def paste_square(images: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 images with a magenta 16x16 square at SQUARE: a defect no training image has."""
    defective = images.clone()
    defective[:, :, 20:36, 20:36] = torch.tensor([255, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return defective
