"""Typed settings with the paper's defaults, and the `cpu` and `paper` presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("revdist", "recontrast", "uniad")
ALIGNERS = ("none", "cada", "cada-sigma", "class-aware", "classifier")


@dataclass
class BaseTraining:
    """Training of the base method (paper Sec. 4.2: AdamW 2e-3, (0.9, 0.999), wd 1e-5, batch 16).

    The defaults are RevDist's; `preset(name, method)` gives each method its own (ReContrast: AMSGrad, eps 1e-10,
    encoder lr 1e-5, LR x0.2 at 80%; UniAD: lr 3e-4, wd 1e-4, batch 64).
    """

    iters: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    amsgrad: bool = False
    encoder_lr: float = 1e-5  # ReContrast's trainable encoder copy; unused by the methods with a frozen encoder
    lr_drop_at: float | None = None  # fraction of the iterations after which every lr is multiplied by lr_drop
    lr_drop: float = 0.2
    # Multi-process training: the effective batch is batch_size x processes; every lr is multiplied by the
    # process count only when this is set (the linear scaling rule).
    scale_lr: bool = False


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
    # Head structure (paper Table 3): 0-2 convolutions keeping the channel count, then 1-3 linear layers.
    convs: int = 1
    linears: int = 2
    # Smooth-L1 threshold; None means "the base method's own scale" (0.1 RevDist, 10 UniAD).
    smooth_l1_alpha: float | None = None
    scale_lr: bool = False  # as BaseTraining.scale_lr


@dataclass
class Settings:
    method: str = "revdist"
    backbone: str = "wide_resnet50_2"
    image_size: int = 256
    align: str = "cada"
    base: BaseTraining = field(default_factory=BaseTraining)
    aligner: AlignTraining = field(default_factory=AlignTraining)
    smoothing_sigma: float = 4.0
    top_fraction: float = 0.01  # image score = mean of the top 1% pixels; 0 = the max pixel
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
        if not 0 <= self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in [0, 1] (0 = max pixel), got {self.top_fraction}")
        if self.aligner.convs not in (0, 1, 2) or self.aligner.linears not in (1, 2, 3):
            raise ValueError("the aligner head has 0-2 convolutions and 1-3 linear layers")
        if not 0 <= self.aligner.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.aligner.dropout}")
        if self.base.iters < 1 or self.aligner.iters < 0:
            raise ValueError("iteration counts must be positive")
        if self.base.lr_drop_at is not None and not 0 < self.base.lr_drop_at <= 1:
            raise ValueError(f"lr_drop_at is a fraction of the iterations in (0, 1], got {self.base.lr_drop_at}")
        return self


def preset(name: str, method: str = "revdist") -> Settings:
    """The settings of `method` under preset `name`.

    `paper`: the paper's schedule (Sec. 4.2; a GPU job). `cpu`: EfficientNet-Lite0 and 400 iterations of batch 16
    for every method, sized for 2 CPU cores and a few hundred training images.
    """
    if name not in ("cpu", "paper"):
        raise ValueError(f"unknown preset {name!r}; choose 'cpu' or 'paper'")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    settings = Settings(method=method)
    if method == "recontrast":  # the reference's multi-class optimisation
        settings.base = BaseTraining(eps=1e-10, amsgrad=True, encoder_lr=1e-5, lr_drop_at=0.8)
    elif method == "uniad":  # paper Sec. 4.2; EfficientNet-B4 as in UniAD, regressor trained 20,000 iterations
        settings.backbone, settings.image_size = "efficientnet_b4", 224
        settings.base = BaseTraining(iters=50_000, batch_size=64, lr=3e-4, weight_decay=1e-4)
        settings.aligner.iters = 20_000
    if name == "cpu":
        # Lite0 has B4's stage structure (strides 2-16), so UniAD keeps its shape and its 224 px input.
        settings.backbone = "efficientnet_lite0"
        settings.base.iters, settings.base.batch_size = 400, 16
        settings.aligner.iters = 1000
    return settings
