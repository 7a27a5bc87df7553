"""The Python front: one Detector object = base method + aligner + settings (+ threshold), saved as one folder."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cada import checkpoint, tiles
from cada.align import Aligner, create_aligner
from cada.align.class_aware import class_score_statistics
from cada.config import Settings
from cada.config import preset as make_preset
from cada.data.dataset import check_batch_size, load_all, normalize
from cada.data.layouts import find_samples
from cada.data.mvtec import Sample
from cada.engine import Checkpointing, Trainer, is_main, world_size
from cada.engine.device import (
    device_name,
    memory_format,
    peak_memory_gib,
    precision_name,
    resolve_device,
    resolve_precision,
)
from cada.engine.log import (
    LOG_FILE,
    TENSORBOARD_FOLDER,
    csv_text,
    read_log,
    require_tensorboard,
    write_tensorboard,
)
from cada.files import atomic_write
from cada.inference import BatchResult, image_distances, infer
from cada.lookalike import SCORE, map_statistics
from cada.methods import BaseMethod, create_method
from cada.threshold import check_calibration, check_fpr, threshold_at_fpr, threshold_f1, unresolved_fpr

log = logging.getLogger(__name__)


@dataclass
class TrainingStages:
    """What `Detector.fit`'s two training stages leave: losses, times and the training images' map statistics."""

    base_losses: list[float]
    base_seconds: float
    aligner_losses: list[float]
    aligner_seconds: float
    image_stats: torch.Tensor


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): `fraction` of each class's images, drawn with `seed`, at least one kept per class."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(samples), []
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for name in sorted({s.class_name for s in samples}):
        members = [i for i, s in enumerate(samples) if s.class_name == name]
        count = min(len(members) - 1, round(fraction * len(members)))
        held.update(rng.choice(members, size=count, replace=False).tolist() if count > 0 else [])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


# A calibration image this close to a training image in the knn aligners' descriptor (unit vectors) is that image:
# measured, an image and itself 3e-4 apart (rounding), the closest two distinct training images of mix6 0.0077.
SAME_IMAGE_DISTANCE = 2e-3


class NotFittedError(ValueError, AttributeError):
    """The Detector is used before `fit` (or `Detector.load`), as scikit-learn's NotFittedError."""


ACCEPTED_IMAGES = (
    "uint8 (0-255) or float (0-1) images, channels first (3 x S x S, N x 3 x S x S: torch's order) or "
    "last (S x S x 3, N x S x S x 3: NumPy/PIL's), as a torch tensor or NumPy array; or image file paths"
)


def check_images(images, image_size: int, resize: str = "squash") -> torch.Tensor:
    """What the Detector accepts as images -> uint8 N x 3 x S x S (S = image_size), as scikit-learn's check_array.

    Accepted: ACCEPTED_IMAGES. Float images must be finite and in [0, 1] (scaled to 0-255); integer images in
    0-255. File paths (a str/Path or a list of them) are decoded and resized exactly as training does (`resize`:
    the run's squash or letterbox); arrays are not resized: another size than the run's is refused. ValueError
    saying what is wrong otherwise.
    """
    if _is_paths(images):
        paths = [images] if isinstance(images, (str, Path)) else list(images)
        samples = [Sample(Path(path), 0, "") for path in paths]
        return load_all(samples, image_size, strict=True, cache_dir=None, resize=resize)[0]
    if isinstance(images, np.ndarray):
        if images.dtype == object or not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
            raise ValueError(f"images must be numeric arrays, got dtype {images.dtype}; accepted: {ACCEPTED_IMAGES}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images must be a torch tensor, a NumPy array or file paths, got {type(images).__name__}; "
            f"accepted: {ACCEPTED_IMAGES}"
        )
    given = tuple(images.shape)
    if images.dim() in (3, 4) and images.shape[-1] == 3 and images.shape[-3] != 3:  # channels last: HWC, NHWC
        # Contiguous: a channels-last memory layout picks other kernels, whose rounding differs in the last bits.
        images = images.movedim(-1, -3).contiguous()
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images of shape {given} are not RGB images; accepted: {ACCEPTED_IMAGES}")
    if tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"images are {images.shape[3]}x{images.shape[2]} pixels but this run takes {image_size}x"
            f"{image_size}: resize them as training did, or pass their file paths (decoded and resized "
            "exactly as in training)"
        )
    if images.dtype == torch.uint8:
        return images
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"images must be uint8 (0-255) or float (0-1), got {images.dtype}")
    if images.is_floating_point():
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        low, high = images.min().item(), images.max().item()
        if low < 0 or high > 1:
            raise ValueError(
                f"float images must be in [0, 1] (they are scaled to 0-255), got values in [{low:g}, "
                f"{high:g}]; pass 0-255 images as uint8"
            )
        return (images * 255).round().to(torch.uint8)
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 255:
        raise ValueError(f"integer images must be in 0-255, got values in [{low}, {high}]")
    return images.to(torch.uint8)


def _is_paths(images) -> bool:
    """One image file path, or a non-empty list of them."""
    return isinstance(images, (str, Path)) or (
        isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(item, (str, Path)) for item in images)
    )


def _batches(images, settings: Settings, batch_size: int = 16) -> Iterable[torch.Tensor]:
    """Checked uint8 batches (see check_images) of one batch, file paths, or an iterable of batches."""
    size, resize = settings.input_size, settings.resize
    check_batch_size(batch_size)
    if isinstance(images, (torch.Tensor, np.ndarray)) or _is_paths(images) or not hasattr(images, "__iter__"):
        return check_images(images, size, resize).split(batch_size)  # not iterable: check_images says what's wrong
    return (check_images(batch, size, resize) for batch in images)


def data_fingerprint(samples: Sequence[Sample], images: torch.Tensor, root=None) -> str:
    """sha256 of the training data as trained on: each image's path (relative to the data root, so a moved data
    folder still matches) and class, and the decoded images themselves."""
    digest = hashlib.sha256()
    for sample in samples:
        path = Path(sample.path)
        if isinstance(root, (str, Path)) and path.is_relative_to(root):
            path = path.relative_to(root)
        digest.update(os.fsencode(path) + b"\0" + sample.class_name.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(images.contiguous().numpy().data)  # the buffer itself, no copy
    return digest.hexdigest()


@dataclass
class Prediction:
    scores: torch.Tensor  # N aligned image scores
    maps: torch.Tensor  # N x H x W aligned maps
    decisions: torch.Tensor | None  # N bool, None until a threshold is set


class Detector:
    """Absolute-unified anomaly detector: no class names at training or at prediction.

    >>> detector = Detector(preset="cpu").fit("data/train_root")          # doctest: +SKIP
    >>> result = detector.predict(images_uint8)                           # doctest: +SKIP

    `device` (auto, cpu, cuda, cuda:N, mps) is where the networks run and `precision` (auto, fp32, bf16, fp16)
    their forward passes' autocast dtype (see `cada.engine.device`); results come back on the CPU. Neither is
    saved with the run.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        preset: str = "cpu",
        pretrained: bool = True,
        weights_path: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
    ):
        self.settings = (settings or make_preset(preset)).validate()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        torch.manual_seed(self.settings.seed)  # reproducible initial weights
        self.method: BaseMethod = create_method(
            self.settings.method,
            self.settings.backbone,
            self.settings.image_size,
            pretrained,
            weights_path,
            **self.settings.method_options(),
        )
        self.aligner: Aligner = create_aligner(self.settings.align, self.method.align_channels, self.settings.aligner)
        # How the one decision threshold was chosen; None until calibrated (see `calibrate`).
        self.calibration: dict | None = None
        self.training_info: dict = {}
        self.training_log: list[dict] = []  # per optimiser step (cada.engine.log), from `fit`; saved as a CSV
        # True after `fit` or `Detector.load`. Set it yourself only to time an untrained model (benchmarks/speed.py).
        self.fitted = False
        self.to(self.device)
        self.eval()

    def to(self, device: str | torch.device, precision: str | None = None) -> Detector:
        """Move the networks and the aligner to `device` (and set `precision`, if given); returns the Detector."""
        self.device = resolve_device(device)
        if precision is not None:
            self.precision = resolve_precision(precision, self.device)
        self._modules().to(self.device).to(memory_format=memory_format(self.device))
        return self

    @property
    def precision_name(self) -> str:
        return precision_name(self.precision)

    def _require_fitted(self, action: str) -> None:
        if not self.fitted:
            raise NotFittedError(
                f"this Detector is not fitted yet: call fit(data) or Detector.load(run) before {action}"
            )

    # -- training ---------------------------------------------------------------------------------------
    def fit(
        self,
        data: str | Path | Sequence[Sample],
        progress: bool = True,
        holdout: float = 0.0,
        fpr: float = 0.01,
        format: str = "auto",
        cache_dir: str | Path | None = "auto",
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 200,
        resume: bool = False,
        resume_hint: str = "",
        keep_checkpoint: bool = False,
        on_start: Callable[[int, int], None] | None = None,
    ) -> Detector:
        """Train the base method, then the aligner, on the normal images of every class of `data` mixed.

        `data` is a data root (MVTec AD, VisA, BTAD or a folder of normal images, see `format`; its training
        split is used) or a list of samples. Decoded images are cached under `cache_dir`. With `holdout`,
        that fraction of each class's training images is kept out of training and used to calibrate the
        threshold at false-positive rate `fpr`.

        With `checkpoint_dir`, a checkpoint is written there every `checkpoint_every` steps (0: only when
        interrupted by SIGINT/SIGTERM) and removed when training finishes (kept with `keep_checkpoint`, for a
        caller that removes it once the run is saved); `resume` continues from it, skipping finished stages, and
        refuses other settings or other training data (paths and decoded images). Launched by torchrun
        (torch.distributed initialised), both stages train with DDP.

        The base trains `settings.base.iters` steps, or with `settings.base.epochs` that many passes over the
        training images read; `on_start(n_images, iterations)` is called with that count before training starts.
        """
        if resume and checkpoint_dir is None:
            raise ValueError("resuming needs the checkpoint folder (checkpoint_dir)")
        if holdout:
            check_fpr(fpr, "fpr")  # before the training, not after
        samples, held_out, chosen = self._training_samples(data, format, holdout)
        images, samples = load_all(samples, self.settings.input_size, cache_dir=cache_dir, resize=self.settings.resize)
        class_names = [s.class_name for s in samples]
        if self.settings.tile > 1:  # the base and the aligner train on the tiles (cada.tiles)
            images = tiles.cut(images, self.settings.image_size, self.settings.tile, self.settings.tile_overlap)
            class_names = tiles.per_tile(class_names, self.settings.tile)
        base_schedule = self.settings.base.resolved(len(images), world_size())
        if on_start is not None:
            on_start(len(images), base_schedule.iterations(len(images)))
        session = None
        if checkpoint_dir is not None:
            identity = {"n_images": len(images), "data_fingerprint": data_fingerprint(samples, images, data)}
            session = Checkpointing(
                checkpoint_dir,
                self._modules(),
                self.settings.to_dict(),
                checkpoint_every,
                resume,
                identity,
                resume_hint,
            )
        stages = self._train_stages(images, class_names, base_schedule, session, progress)
        if session is not None and not keep_checkpoint:
            session.complete()
        self.fitted = True
        self.eval()
        self.training_info = self._training_info(data, chosen, samples, len(images), base_schedule, stages)
        if held_out:
            held_out_images, held_out = load_all(
                held_out, self.settings.input_size, cache_dir=cache_dir, resize=self.settings.resize
            )
            self.calibrate(
                held_out_images, fpr, source=f"{len(held_out)} training images held out ({holdout:.0%} per class)"
            )
        return self

    def _training_samples(
        self, data: str | Path | Sequence[Sample], format: str, holdout: float
    ) -> tuple[list[Sample], list[Sample], str]:
        """(the samples to train on, those held out to calibrate, the layout read or "samples")."""
        chosen = "samples"
        if isinstance(data, (str, Path)):
            samples, chosen = find_samples(data, "train", format)
        else:
            samples = list(data)
        if not samples:
            raise ValueError("no training images given")
        kept, held_out = split_holdout(samples, holdout, self.settings.seed)
        return kept, held_out, chosen

    def _train_stages(self, images, class_names, base_schedule, session, progress: bool) -> TrainingStages:
        """The base, then the aligner on the training images' statistics; a resumed run skips a finished base."""
        generator = torch.Generator().manual_seed(self.settings.seed)
        trainer = Trainer(session, progress, self.device, self.precision)
        with trainer.signals():
            started = time.perf_counter()
            if session is not None and session.resumed_stage() == "aligner":  # the base finished before the stop
                session.restore_model()
                if is_main():
                    log.info(f"resuming from {session.folder}: base training finished, continuing with the aligner")
                base_losses, base_seconds = session.losses_of(self.method.name), session.finished["base"]["seconds"]
            else:
                if session is not None:
                    session.enter("base")
                base_losses = self.method.fit(
                    images,
                    base_schedule,
                    generator,
                    progress,
                    cache_gib=self.settings.feature_cache_gib,
                    trainer=trainer,
                )
                base_seconds = time.perf_counter() - started
                if session is not None:
                    session.finish_stage("base", generator, "aligner", seconds=round(base_seconds, 1))
            if session is not None:
                session.enter("aligner")
            started = time.perf_counter()
            features, image_stats = self.training_statistics(images, progress, trainer)
            aligner_losses = self.fit_aligner(features, image_stats, class_names, generator, progress, trainer)
        self.training_log = list(trainer.log)
        aligner_seconds = time.perf_counter() - started
        return TrainingStages(base_losses, base_seconds, aligner_losses, aligner_seconds, image_stats)

    def _training_info(self, data, chosen: str, samples: list[Sample], n_images: int, base_schedule, stages) -> dict:
        """What the run records of its training (config.json's "training")."""
        settings = self.settings
        peak = peak_memory_gib(self.device)
        trained = self.method.trains_by_gradient()
        return {
            "data": str(data) if isinstance(data, (str, Path)) else None,
            "format": chosen,
            "n_images": len(samples),
            "classes": sorted({s.class_name for s in samples}),
            # The resolved schedule: steps of the effective batch (PatchCore trains none: one pass).
            "base_iters": base_schedule.iters if trained else None,
            "base_epochs": round(base_schedule.passes(n_images, world_size()), 2) if trained else None,
            "base_seconds": round(stages.base_seconds, 1),
            "aligner_seconds": round(stages.aligner_seconds, 1),
            # None for a method without gradient training (PatchCore): it has no loss to report.
            "base_loss_first_last": [stages.base_losses[0], stages.base_losses[-1]] if stages.base_losses else None,
            "aligner_loss_first_last": [stages.aligner_losses[0], stages.aligner_losses[-1]]
            if stages.aligner_losses
            else None,
            "mean_image_stats": dict(zip(("mean", "max", "std", "score"), stages.image_stats.mean(dim=0).tolist())),
            # The class-aware reference of `cada evaluate` (its oracle row); nothing at prediction reads class names.
            # (tiled: of each image's largest tile score, as its test images are scored)
            "class_score_stats": class_score_statistics(
                tiles.per_image(stages.image_stats[:, SCORE], settings.tile).amax(dim=1),
                [s.class_name for s in samples],
            ),
            "processes": world_size(),
            "effective_batch": settings.base.batch_size * world_size(),
            # Where it trained (informative only: a run loads on any device).
            "device": device_name(self.device),
            "precision": self.precision_name,
            "peak_device_memory_gib": None if peak is None else round(peak, 2),
        }

    def fit_aligner(
        self,
        features: torch.Tensor,
        image_stats: torch.Tensor,
        class_names: list[str],
        generator: torch.Generator | None = None,
        progress: bool = True,
        trainer: Trainer | None = None,
    ) -> list[float]:
        """Train the aligner alone on cached training statistics; the base method is not touched."""
        settings = self.settings.aligner
        if settings.smooth_l1_alpha is None:
            settings.smooth_l1_alpha = self.method.score_scale
        generator = generator or torch.Generator().manual_seed(self.settings.seed)
        trainer = trainer or Trainer(progress=progress, device=self.device)
        return self.aligner.fit(features, image_stats, settings, generator, class_names, progress, trainer=trainer)

    @torch.inference_mode()
    def training_statistics(
        self, images: torch.Tensor, progress: bool = False, trainer: Trainer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligner inputs and targets from the frozen base: features and per-image `map_statistics` (raw map mean,
        max, std and the image score). `trainer`: the run's, whose signals stop this pass between batches."""
        trainer = trainer or Trainer(progress=progress, device=self.device, precision=self.precision)
        self.eval()
        features, targets = [], []
        batch_size = self.settings.base.batch_size
        for start in tqdm(
            range(0, len(images), batch_size), desc="training-set maps", disable=not progress, leave=False
        ):
            trainer.stop_point("computing the maps of the training images")
            batch = images[start : start + batch_size]
            with trainer.autocast():
                output = self.method.training_output(
                    normalize(batch, self.device), torch.arange(start, start + len(batch), device=self.device)
                )
            features.append(output.align_features.float())
            targets.append(
                map_statistics(output.anomaly_map.float(), self.settings.smoothing_sigma, self.settings.top_fraction)
            )
        return torch.cat(features).clone(), torch.cat(targets).clone()

    # -- the one threshold -------------------------------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """Aligned image scores >= threshold are anomalous, whatever the product."""
        return None if self.calibration is None else self.calibration["threshold"]

    @property
    def thresholds(self) -> dict[str, float]:
        """Per map ('none': the base map, and the aligner's), for evaluating decisions of both."""
        if self.calibration is None:
            return {}
        return {"none": self.calibration["base_threshold"], self.settings.align: self.calibration["threshold"]}

    def _all_scores(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(base, aligned) scores of calibration images; warns when some are the run's own training images."""
        base, aligned, seen = [], [], 0
        for batch in _batches(images, self.settings):
            result = self.infer(batch)
            base.append(result.base_scores)
            aligned.append(result.aligned_scores)
            distance = image_distances(self.aligner, result.align_features.to(self.device), self.settings)
            if distance is not None:
                seen += int((distance < SAME_IMAGE_DISTANCE).sum())
        if not base:
            raise ValueError("no images given")
        if seen:
            warnings.warn(
                f"{seen} of {sum(map(len, base))} calibration images are training images of this run: they score "
                "lower than new normal images, so the threshold comes out lower and flags more new normal images "
                "than the target rate; calibrate on normal images the run did not train on (cada train --holdout)"
            )
        return torch.cat(base).numpy(), torch.cat(aligned).numpy()

    def calibrate(self, normal_images, fpr: float = 0.01, source: str = "") -> dict:
        """Choose the threshold from held-out normal images (as `predict` takes them) at a target false-positive rate.

        Never calibrate on test images: the point is an honest false-positive rate on new ones.
        """
        self._require_fitted("calibrate")
        check_fpr(fpr, "fpr")
        base, aligned = self._all_scores(normal_images)
        unresolved = unresolved_fpr(len(aligned), fpr)
        if unresolved:
            warnings.warn(unresolved)
        self.calibration = {
            "threshold": threshold_at_fpr(aligned, fpr),
            "base_threshold": threshold_at_fpr(base, fpr),
            "how": "fpr",
            "target_fpr": fpr,
            "n_normal": len(aligned),
            "n_anomalous": 0,
            "source": source,
            "normal_scores": aligned.tolist(),
        }  # other operating points later
        return self.calibration

    def calibrate_f1(self, images, labels, source: str = "") -> dict:
        """Choose the F1-optimal threshold on a labelled validation set (not the test set)."""
        self._require_fitted("calibrate_f1")
        base, aligned = self._all_scores(images)
        labels = np.asarray(labels).ravel()
        if len(labels) != len(aligned):
            raise ValueError(f"{len(labels)} labels for {len(aligned)} images")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
        labels = labels.astype(bool)
        self.calibration = {
            "threshold": threshold_f1(aligned, labels),
            "base_threshold": threshold_f1(base, labels),
            "how": "f1",
            "target_fpr": None,
            "n_normal": int((~labels).sum()),
            "n_anomalous": int(labels.sum()),
            "source": source,
            "normal_scores": aligned[~labels].tolist(),
        }
        return self.calibration

    # -- inference ---------------------------------------------------------------------------------------
    def eval(self) -> Detector:
        self.method.eval()
        self.aligner.eval()
        return self

    @torch.inference_mode()
    def infer(self, images: torch.Tensor, class_names: list[str] | None = None) -> BatchResult:
        """One batch of images (see check_images) -> smoothed base maps, base scores and alignment statistics.

        `class_names` is read only by the class-aware reference aligner (CaDA-A); the detector itself never needs it.
        """
        self._require_fitted("infer")
        checked = check_images(images, self.settings.input_size, self.settings.resize)
        return infer(self.method, self.aligner, checked, self.settings, class_names, self.precision).cpu()

    def predict(self, images, batch_size: int = 16) -> Prediction:
        """Aligned image scores and maps (and decisions, once a threshold is set) of `images`: one image or a batch
        (uint8 0-255 or float 0-1, channels first or last, tensor or NumPy array, of the run's size), image file
        paths (decoded and resized as in training), or an iterable of batches. See check_images."""
        self._require_fitted("predict")
        scores, maps = [], []
        for batch in _batches(images, self.settings, batch_size):
            result = self.infer(batch)
            scores.append(result.aligned_scores)
            maps.append(result.aligned_maps)
        if not scores:
            raise ValueError("no images given")
        score_tensor = torch.cat(scores)
        decisions = None if self.threshold is None else score_tensor >= self.threshold
        return Prediction(score_tensor, torch.cat(maps), decisions)

    # -- persistence -------------------------------------------------------------------------------------
    def _modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"method": self.method, "aligner": self.aligner})

    def save(self, folder: str | Path, overwrite: bool = False, tensorboard: bool = False) -> Path:
        """Write the run folder (weights + config.json, and the training log of `fit` as train_log.csv, with
        `tensorboard` also as TensorBoard scalars in RUN/tensorboard) in one step; an existing run is replaced only
        with `overwrite`, and a folder that is neither a run nor empty never (see `cada.checkpoint`)."""
        self._require_fitted("save")
        if tensorboard:
            require_tensorboard()
        rows = self.training_log

        def write_log(staging: Path) -> None:
            if rows:
                atomic_write(staging / LOG_FILE, csv_text(rows))
            if rows and tensorboard:
                write_tensorboard(rows, staging / TENSORBOARD_FOLDER)

        config = {
            "settings": self.settings.to_dict(),
            "calibration": self.calibration,
            "training": self.training_info,
            "aligner_state": self.aligner.config_state(),
        }
        return checkpoint.save_run(folder, self._modules().state_dict(), config, overwrite, write_log)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "auto", precision: str = "auto") -> Detector:
        """A saved run, its networks on `device` (see the class docstring)."""
        config = checkpoint.read_run_config(folder)
        where = Path(folder) / checkpoint.CONFIG_FILE
        if "settings" not in config:
            raise checkpoint.IncompatibleRunError(f"{where} has no settings")
        try:
            settings = Settings.from_dict(config["settings"])
            calibration = check_calibration(config.get("calibration"))
        except ValueError as error:
            raise checkpoint.IncompatibleRunError(f"{where}: {error}") from None
        detector = cls(settings, pretrained=False, device=device, precision=precision)
        detector.aligner.load_config_state(config.get("aligner_state", {}))
        state = checkpoint.load_weights(folder)
        try:
            detector._modules().load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise checkpoint.IncompatibleRunError(
                f"the weights in {folder} do not fit the model its config describes: {error}"
            ) from error
        detector.to(detector.device)  # buffers resized while loading (a memory bank, the knn aligner's)
        detector.calibration = calibration
        detector.training_info = config.get("training", {})
        log = Path(folder) / LOG_FILE
        if log.is_file():  # runs from before the log, and PatchCore + knn (nothing trained by steps), have none
            try:
                detector.training_log = read_log(log)
            except ValueError as error:  # an auxiliary file: the model itself is sound
                warnings.warn(f"{error}; loading the run without its training log")
        detector.fitted = True
        return detector.eval()
