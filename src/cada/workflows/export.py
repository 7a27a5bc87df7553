"""`cada export --int8`'s calibration images: the run's own training normals, as the run was trained on them."""

from __future__ import annotations

from pathlib import Path

import torch

from cada.files import printable
from cada.workflows.common import find_split

CALIBRATION_IMAGES = 300  # NNCF's default subset size: activation ranges settle well before it


def calibration_images(detector, data: str | Path | None = None, count: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """Up to `count` training images of `data` (default: the data the run was trained on) drawn with the run's
    seed, resized as the run resizes: uint8 N x 3 x S x S."""
    from cada.data.dataset import load_all

    if int(count) != count or count < 1:
        raise ValueError(f"--calibration-images must be a positive integer, got {count}")
    info = detector.training_info
    layout = "auto" if data else info.get("format", "auto")
    data = data or info.get("data")
    if not data or not Path(data).is_dir():
        where = f"its training data {printable(data)} is not there" if data else "it does not say where it trained"
        raise ValueError(f"--int8 calibrates on the run's training images and {where}: give --calibration-data ROOT")
    samples = find_split(data, "train", layout, quiet=True)
    chosen = torch.randperm(len(samples), generator=torch.Generator().manual_seed(detector.settings.seed))[: int(count)]
    settings = detector.settings
    return load_all([samples[i] for i in sorted(chosen.tolist())], settings.input_size, resize=settings.resize)[0]
