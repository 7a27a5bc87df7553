"""Typed settings with the paper's defaults, and the `cpu` and `paper` presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("revdist", "recontrast", "uniad", "patchcore")
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


@dataclass
class PatchCoreSettings:
    """PatchCore (no gradient training): coreset, search memory and image-score re-weighting.

    The memory bank is a greedy k-center coreset of `coreset_ratio` of all training patches (paper: 10%), picked
    with distances between random projections to `projection_dim` dimensions (paper: 128). Selection runs on
    consecutive blocks of about `coreset_block` patches streamed from the encoder, so the full features of the
    training set are never held (see methods/patchcore.py). `search_gib` bounds one chunk of the query x bank
    distance matrix in the nearest-neighbour search. `neighbours` is b of the paper's image-score re-weighting.
    """

    coreset_ratio: float = 0.1
    projection_dim: int = 128
    coreset_block: int = 16384
    search_gib: float = 0.5
    neighbours: int = 9


@dataclass
class Settings:
    method: str = "revdist"
    backbone: str = "wide_resnet50_2"
    image_size: int = 256
    align: str = "cada"
    base: BaseTraining = field(default_factory=BaseTraining)
    aligner: AlignTraining = field(default_factory=AlignTraining)
    patchcore: PatchCoreSettings = field(default_factory=PatchCoreSettings)  # read by method "patchcore" only
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
        patchcore = PatchCoreSettings(**data.pop("patchcore", {}))  # absent from runs saved before PatchCore
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(base=base, aligner=aligner, patchcore=patchcore, **data)

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
        patchcore = self.patchcore
        if not 0 < patchcore.coreset_ratio <= 1:
            raise ValueError(f"patchcore.coreset_ratio is a fraction in (0, 1], got {patchcore.coreset_ratio}")
        if patchcore.projection_dim < 1 or patchcore.coreset_block < 1 or patchcore.neighbours < 1:
            raise ValueError("patchcore.projection_dim, patchcore.coreset_block and patchcore.neighbours must be >= 1")
        if not patchcore.search_gib > 0:
            raise ValueError(f"patchcore.search_gib must be positive, got {patchcore.search_gib}")
        return self


def preset(name: str, method: str = "revdist") -> Settings:
    """The settings of `method` under preset `name`.

    `paper`: the paper's schedule (Sec. 4.2; a GPU job). `cpu`: EfficientNet-Lite0 and 400 iterations of batch 16
    for every method, sized for 2 CPU cores and a few hundred training images. PatchCore trains no weights (its
    fit is one pass that ignores iters and lr); `paper` gives it wide_resnet50_2 at 256 px, `cpu` Lite0.
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
