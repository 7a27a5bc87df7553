"""The Python front: one Detector object = base method + aligner + settings (+ threshold), saved as one folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cada import checkpoint
from cada.align import Aligner, create_aligner
from cada.config import Settings
from cada.config import preset as make_preset
from cada.data.dataset import load_all, normalize
from cada.data.mvtec import Sample, mvtec_samples
from cada.methods import BaseMethod, create_method
from cada.scoring import align, image_score, smooth


@dataclass
class BatchResult:
    """Per-image outputs of one batch. `maps` is the smoothed base map; aligned = (maps - u) / spread."""

    maps: torch.Tensor  # B x H x W
    base_scores: torch.Tensor  # B
    u: torch.Tensor  # B
    spread: torch.Tensor  # B, gamma - u kept away from zero

    @property
    def aligned_scores(self) -> torch.Tensor:
        return align(self.base_scores, self.u, self.spread)

    @property
    def aligned_maps(self) -> torch.Tensor:
        return align(self.maps, self.u, self.spread)


@dataclass
class Prediction:
    scores: torch.Tensor  # N aligned image scores
    maps: torch.Tensor  # N x H x W aligned maps
    decisions: torch.Tensor | None  # N bool, None until a threshold is set


class Detector:
    """Absolute-unified anomaly detector: no class names at training or at prediction.

    >>> detector = Detector(preset="cpu").fit("data/train_root")          # doctest: +SKIP
    >>> result = detector.predict(images_uint8)                           # doctest: +SKIP
    """

    def __init__(self, settings: Settings | None = None, *, preset: str = "cpu", pretrained: bool = True,
                 weights_path: str | None = None):
        self.settings = (settings or make_preset(preset)).validate()
        torch.manual_seed(self.settings.seed)  # reproducible initial weights
        self.method: BaseMethod = create_method(
            self.settings.method, self.settings.backbone, self.settings.image_size, pretrained, weights_path
        )
        self.aligner: Aligner = create_aligner(self.settings.align, self.method.align_channels, self.settings.aligner)
        self.threshold: float | None = None
        self.training_info: dict = {}
        self.eval()

    # -- training ---------------------------------------------------------------------------------------
    def fit(self, data: str | Path | Sequence[Sample], progress: bool = True) -> "Detector":
        """Train the base method, then the aligner, on the normal images of every class of `data` mixed.

        `data` is an MVTec-layout root (its train/good images are used) or a list of samples.
        """
        samples = mvtec_samples(data, "train") if isinstance(data, (str, Path)) else list(data)
        if not samples:
            raise ValueError("no training images given")
        settings = self.settings
        images, samples = load_all(samples, settings.image_size)
        generator = torch.Generator().manual_seed(settings.seed)
        started = time.perf_counter()
        base_losses = self.method.fit(images, settings.base, generator, progress, cache_gib=settings.feature_cache_gib)
        base_seconds = time.perf_counter() - started
        started = time.perf_counter()
        features, targets = self.training_statistics(images, progress)
        aligner_settings = settings.aligner
        if aligner_settings.smooth_l1_alpha is None:
            aligner_settings.smooth_l1_alpha = self.method.score_scale
        aligner_losses = self.aligner.fit(
            features, targets, aligner_settings, generator, [s.class_name for s in samples], progress
        )
        self.eval()
        self.training_info = {
            "n_images": len(samples),
            "classes": sorted({s.class_name for s in samples}),
            "base_seconds": round(base_seconds, 1),
            "aligner_seconds": round(time.perf_counter() - started, 1),
            "base_loss_first_last": [base_losses[0], base_losses[-1]],
            "aligner_loss_first_last": [aligner_losses[0], aligner_losses[-1]] if aligner_losses else None,
            "target_mean_u_gamma": targets.mean(dim=0).tolist(),
        }
        return self

    @torch.inference_mode()
    def training_statistics(self, images: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligner inputs and targets: features and per-image (mean, max) of the raw map, from the frozen base."""
        self.eval()
        features, targets = [], []
        batch_size = self.settings.base.batch_size
        for start in tqdm(range(0, len(images), batch_size), desc="training-set maps", disable=not progress, leave=False):
            output = self.method(normalize(images[start : start + batch_size]))
            raw = output.anomaly_map.flatten(1)
            features.append(output.align_features)
            targets.append(torch.stack([raw.mean(dim=1), raw.amax(dim=1)], dim=1))
        return torch.cat(features).clone(), torch.cat(targets).clone()

    # -- inference ---------------------------------------------------------------------------------------
    def eval(self) -> "Detector":
        self.method.eval()
        self.aligner.eval()
        return self

    @torch.inference_mode()
    def infer(self, images: torch.Tensor) -> BatchResult:
        """uint8 B x 3 x S x S (already resized) -> smoothed base maps, base scores and alignment statistics."""
        output = self.method(normalize(images))
        maps = smooth(output.anomaly_map, self.settings.smoothing_sigma)
        u, gamma = self.aligner.stats(output.align_features)
        return BatchResult(maps, image_score(maps, self.settings.top_fraction), u, self.aligner.spread(u, gamma))

    def predict(self, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 16) -> Prediction:
        """Aligned image scores and maps (and decisions, once a threshold is set) for uint8 images."""
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            batches = images.split(batch_size)
        else:
            batches = images
        scores, maps = [], []
        for batch in batches:
            result = self.infer(batch)
            scores.append(result.aligned_scores)
            maps.append(result.aligned_maps)
        score_tensor = torch.cat(scores)
        decisions = None if self.threshold is None else score_tensor > self.threshold
        return Prediction(score_tensor, torch.cat(maps), decisions)

    # -- persistence -------------------------------------------------------------------------------------
    def _modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"method": self.method, "aligner": self.aligner})

    def save(self, folder: str | Path) -> Path:
        config = {
            "settings": self.settings.to_dict(),
            "threshold": self.threshold,
            "training": self.training_info,
        }
        return checkpoint.save_run(folder, self._modules().state_dict(), config)

    @classmethod
    def load(cls, folder: str | Path) -> "Detector":
        config = checkpoint.read_config(folder)
        detector = cls(Settings.from_dict(config["settings"]), pretrained=False)
        state = checkpoint.load_weights(folder)
        try:
            detector._modules().load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise checkpoint.IncompatibleRunError(
                f"the weights in {folder} do not fit the model its config describes: {error}"
            ) from error
        detector.threshold = config.get("threshold")
        detector.training_info = config.get("training", {})
        return detector.eval()
