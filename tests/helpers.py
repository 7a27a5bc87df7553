"""Small pieces the method tests share."""

from contextlib import contextmanager

import pytest
import torch

from cada.backbones import VIT_BACKBONES
from cada.config import Settings, preset


def train_args(data, out, *extra: str, iters: int = 2, align_iters: int = 3) -> list[str]:
    """`cada train` arguments of a tiny quiet run at 64 px; `extra` adds options (a repeated one wins)."""
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "64",
        "--iters",
        str(iters),
        "--align-iters",
        str(align_iters),
        "--quiet",
        *extra,
    ]


SQUARE = (slice(None), slice(20, 36), slice(20, 36))  # where `paste_square` puts its defect (64 px images)


def tiny_preset(method: str, iters: int = 3) -> Settings:
    """The cpu preset of `method` at 64 px with Lite0: `iters` base steps of batch 4, 5 regressor steps of batch 4."""
    settings = preset("cpu", method)
    settings.image_size = 64
    if settings.backbone not in VIT_BACKBONES:  # a ViT method keeps its ViT (its random weights: conftest.py)
        settings.backbone = "efficientnet_lite0"  # the smallest encoder: fast tests
    settings.base.iters, settings.base.epochs, settings.base.batch_size = iters, None, 4
    settings.aligner.iters, settings.aligner.batch_size = 5, 4
    return settings


def paste_square(images: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 images with a magenta 16x16 square at SQUARE: a defect no training image has."""
    defective = images.clone()
    defective[:, :, 20:36, 20:36] = torch.tensor([255, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return defective


def square_means(model, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the mean of the anomaly map inside SQUARE for `clean` and for it with the square pasted."""
    from cada.data.dataset import normalize

    with torch.inference_mode():
        maps = [model(normalize(images)).anomaly_map for images in (clean, paste_square(clean))]
    return tuple(anomaly_map[SQUARE].mean(dim=(1, 2)) for anomaly_map in maps)


def assert_save_load_bit_exact(detector, folder, images: torch.Tensor):
    """Save and load `detector`: the same tensors, bit for bit, and the same predictions. Returns the loaded one."""
    from cada import Detector

    detector.save(folder)
    loaded = Detector.load(folder)
    state, loaded_state = detector._modules().state_dict(), loaded._modules().state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(v, loaded_state[k]) for k, v in state.items())
    before, after = detector.predict(images), loaded.predict(images)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)
    return loaded


@contextmanager
def stop_after_steps(steps: int):
    """While the block runs, a training run stops as if SIGTERM arrived during its optimiser step `steps` (counted
    over its stages): the checkpoint session is asked to stop then, as the signal handler does."""
    from cada.engine.resume import Checkpointing

    original = Checkpointing.stop_wanted

    def stop_wanted(self):
        self.test_steps = getattr(self, "test_steps", 0) + 1
        if self.test_steps >= steps:
            self.request_stop()
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointing, "stop_wanted", stop_wanted)
        yield
