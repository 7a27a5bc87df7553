"""Typed settings with the paper's defaults, and the `cpu` and `paper` presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("revdist",)
ALIGNERS = ("none", "cada")


@dataclass
class BaseTraining:
    """Training of the base method (paper Sec. 4.2: AdamW 2e-3, (0.9, 0.999), wd 1e-5, batch 16)."""

    iters: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5


@dataclass
class AlignTraining:
    """Training of the CADA regressor (paper Sec. 3.3, 4.2)."""

    iters: int = 5000
    batch_size: int = 16
    lr: float = 5e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dropout: float = 0.25
    hidden: int = 256
    # Smooth-L1 threshold; None means "the base method's own scale" (0.1 RevDist, 10 UniAD).
    smooth_l1_alpha: float | None = None


@dataclass
class Settings:
    method: str = "revdist"
    backbone: str = "wide_resnet50_2"
    image_size: int = 256
    align: str = "cada"
    base: BaseTraining = field(default_factory=BaseTraining)
    aligner: AlignTraining = field(default_factory=AlignTraining)
    smoothing_sigma: float = 4.0
    top_fraction: float = 0.01  # image score = mean of the top 1% pixels
    seed: int = 0
    # Encoder features of the training set are kept in memory (the encoder is frozen) when they fit.
    feature_cache_gib: float = 4.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        data = dict(data)
        base = BaseTraining(**{**data.pop("base", {})})
        base.betas = tuple(base.betas)
        aligner = AlignTraining(**data.pop("aligner", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(base=base, aligner=aligner, **data)

    def validate(self) -> "Settings":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.align not in ALIGNERS:
            raise ValueError(f"unknown aligner {self.align!r}; choose one of {', '.join(ALIGNERS)}")
        if self.image_size < 64 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {self.image_size}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.base.iters < 1 or self.aligner.iters < 0:
            raise ValueError("iteration counts must be positive")
        return self


def preset(name: str) -> Settings:
    """`paper`: the paper's schedule (a GPU job). `cpu`: EfficientNet-Lite0, sized for 2 CPU cores."""
    if name == "paper":
        return Settings()
    if name == "cpu":
        return Settings(
            backbone="efficientnet_lite0",
            base=BaseTraining(iters=400),
            aligner=AlignTraining(iters=1000),
        )
    raise ValueError(f"unknown preset {name!r}; choose 'cpu' or 'paper'")
