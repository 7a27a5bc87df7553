"""Typed settings with the paper's defaults, and the `cpu` and `paper` presets.

The generic blocks live here; each method's own options block is its registered options dataclass (see
`cada.registry`), held in `Settings.method_blocks` and read and written under the method's name
(`settings.patchcore`, "patchcore" in config.json). Every field is validated from its annotation and `RANGES`
(a block's own ranges: its `RANGES` class attribute)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cada.files import shown
from cada.registry import ALIGNERS, METHODS


@dataclass
class BaseTraining:
    """Training of the base method (paper Sec. 4.2: AdamW 2e-3, (0.9, 0.999), wd 1e-5, batch 16).

    The defaults are RevDist's; `preset(name, method)` gives each method its own (ReContrast: AMSGrad, eps 1e-10,
    encoder lr 1e-5, LR x0.2 at 80%; UniAD: lr 3e-4, wd 1e-4, batch 64).

    The length is given by exactly one of `iters` (optimiser steps) and `epochs` (passes over the training
    images: ceil(epochs x images / effective batch) steps, but at least `min_iters`, resolved when the images are
    known, see `resolved`), so that a mix of more products gets more steps instead of fewer passes over each.
    """

    iters: int | None = 5000
    epochs: float | None = None
    min_iters: int = 0  # with epochs: a small training set still gets this many steps
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    amsgrad: bool = False
    encoder_lr: float = 1e-5  # ReContrast's trainable encoder copy; unused by the methods with a frozen encoder
    # Fraction(s) of the iterations after which every lr is multiplied by lr_drop (DRAEM: [0.8, 0.9]).
    lr_drop_at: float | list[float] | None = None
    lr_drop: float = 0.2
    # Multi-process training: the effective batch is batch_size x processes; every lr is multiplied by the
    # process count only when this is set (the linear scaling rule).
    scale_lr: bool = False

    def iterations(self, n_images: int, processes: int = 1) -> int:
        """The optimiser steps for `n_images` training images and `processes` processes (each its own batch)."""
        if self.iters is not None:
            return self.iters
        assert self.epochs is not None  # validate: exactly one of iters and epochs
        return max(1, self.min_iters, math.ceil(self.epochs * n_images / (self.batch_size * processes)))

    def passes(self, n_images: int, processes: int = 1) -> float:
        """How many passes over `n_images` training images the (resolved) schedule makes."""
        return self.iterations(n_images, processes) * self.batch_size * processes / n_images

    def resolved(self, n_images: int, processes: int = 1) -> BaseTraining:
        """A copy with `iters` set to `iterations(n_images, processes)`: what the training loop runs."""
        return dataclasses.replace(self, iters=self.iterations(n_images, processes), epochs=None)

    def lr_milestones(self) -> list[int]:
        """The iterations after which the learning rates drop (of a resolved schedule)."""
        if self.iters is None:
            raise ValueError("the schedule is given in epochs: resolve it for the training images first (resolved)")
        if self.lr_drop_at is None:
            return []
        fractions = self.lr_drop_at if isinstance(self.lr_drop_at, (list, tuple)) else [self.lr_drop_at]
        return [round(fraction * self.iters) for fraction in fractions]


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
    # knn aligners: how many nearest training images give an image's normal score statistics.
    neighbours: int = 20  # measured: 20 >= 10 >= 5 in pooled I-AUROC on realmix, realmix-extra and their mix
    # knn-distance: weight of the nearest-training-image distance's z-score added to the aligned score
    # (docs/results/aligners.md).
    distance_weight: float = 0.5


RESIZE_MODES = ("squash", "letterbox")  # see cada.data.resize


@dataclass
class Settings:
    method: str = "revdist"
    backbone: str = "wide_resnet50_2"
    image_size: int = 256
    # How an image fits the image_size square (cada.data.resize): "squash" (each axis resized) or "letterbox"
    # (aspect ratio kept, padded). Training, evaluation, prediction and export all use the run's.
    resize: str = "squash"
    # Tiles per side for large images with small defects (1: none), and the fraction of a tile its neighbour shares;
    # see cada.tiles. The images are fitted to input_size, then cut into tiles of image_size.
    tile: int = 1
    tile_overlap: float = 0.0
    # knn-distance (k = 20) by measurement with the cpu preset's base on realmix, realmix-extra and their 6-product
    # mix (benchmarks/aligners.py, docs/results/aligners.md); the paper's own aligner is `cada`, for reproduction.
    align: str = "knn-distance"
    base: BaseTraining = field(default_factory=BaseTraining)
    aligner: AlignTraining = field(default_factory=AlignTraining)
    smoothing_sigma: float = 4.0
    top_fraction: float = 0.01  # image score = mean of the top 1% pixels; 0 = the max pixel
    seed: int = 0
    # Encoder features of the training set are kept in memory (the encoder is frozen) when they fit.
    feature_cache_gib: float = 4.0
    # The options block of every registered method that has one, by method name; read only when that method is
    # chosen (see method_options). Reached as attributes: settings.patchcore.
    method_blocks: dict[str, Any] = field(default_factory=lambda: _default_blocks(), repr=False)

    def __getattr__(self, name: str):  # only called for names that are not ordinary attributes
        blocks = self.__dict__.get("method_blocks")
        if blocks is not None and name in blocks:
            return blocks[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        blocks = self.__dict__.get("method_blocks")
        if blocks is not None and name in blocks:
            blocks[name] = value
        else:
            super().__setattr__(name, value)

    def to_dict(self) -> dict:
        """Plain values, the method blocks under their names right after `aligner` (config.json's layout)."""
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            if item.name == "method_blocks":
                continue
            value = getattr(self, item.name)
            is_block = dataclasses.is_dataclass(value) and not isinstance(value, type)
            data[item.name] = dataclasses.asdict(value) if is_block else value
            if item.name == "aligner":
                data.update({name: dataclasses.asdict(block) for name, block in self.method_blocks.items()})
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        """Settings from `to_dict`'s output (a run's config.json), validated. Blocks absent from runs saved before
        they existed (e.g. `patchcore`) get their defaults; unknown names are refused, naming them."""
        return _from_dict(cls, data, "").validate()

    @property
    def input_size(self) -> int:
        """The side of the square every image is fitted to: image_size, or with tiles the square they are cut from."""
        from cada.tiles import input_size

        return input_size(self.image_size, self.tile, self.tile_overlap)

    def method_options(self) -> dict:
        """Constructor options of the chosen method beyond (backbone, image_size): its own architecture/loss."""
        own = self.method_blocks.get(self.method)
        return {} if own is None else dataclasses.asdict(own)

    def validate(self) -> Settings:
        """Check every field's type and range (see RANGES); ValueError naming the field otherwise."""
        _check_fields(self, "")
        METHODS[self.method], ALIGNERS[self.align]  # noqa: B018 - "unknown method 'x'; choose one of ..."
        for name, block in self.method_blocks.items():
            options = METHODS[name].options if name in METHODS else None
            if options is None or not isinstance(block, options):
                raise ValueError(
                    f"{name} must be a {getattr(options, '__name__', 'registered options')} block, got {shown(block)}"
                )
            _check_fields(block, name + ".")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {shown(self.resize)}")
        if self.tile_overlap and self.tile == 1:
            raise ValueError(f"tile_overlap ({self.tile_overlap}) is the overlap of tiles: set tile above 1 too")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 in {RANGES['image_size']}, got {self.image_size}")
        if ALIGNERS[self.align].extra.get("trained") and self.aligner.iters < 1:
            untrained = [f"'{name}'" for name in ALIGNERS if not ALIGNERS[name].extra.get("trained")]
            listed = ", ".join(untrained[:-1]) + " and " + untrained[-1] if len(untrained) > 1 else untrained[0]
            raise ValueError(
                f"aligner.iters must be at least 1: the {self.align} aligner is trained (only align "
                f"{listed} train nothing), got {self.aligner.iters}"
            )
        if (self.base.iters is None) == (self.base.epochs is None):
            raise ValueError(
                f"base training needs exactly one of iters and epochs, got iters={self.base.iters}, "
                f"epochs={self.base.epochs}"
            )
        return self


def _default_blocks() -> dict[str, Any]:
    return {name: options() for name in METHODS if (options := METHODS[name].options) is not None}


# Allowed values of the numeric settings, by dotted name; "[" and "]" include the bound, "(" and ")" exclude it.
# Upper bounds are far beyond any sensible run and keep a typo (image_size 100000, hidden 1e7) from exhausting
# memory. A numeric field not listed here (nor in its block's own RANGES) is only checked for its type and for
# being finite.
RANGES = {
    "image_size": "[64, 1024]",  # and a multiple of 32
    "tile": "[1, 16]",
    "tile_overlap": "[0, 0.75]",
    "smoothing_sigma": "[0, 16]",  # 0: no smoothing
    "top_fraction": "[0, 1]",  # 0: the max pixel
    "seed": "[0, 4294967295]",
    "feature_cache_gib": "[0, 1024]",
    "base.iters": "[1, 10000000]",
    "base.epochs": "(0, 1000000]",
    "base.min_iters": "[0, 10000000]",
    "base.batch_size": "[1, 4096]",
    "base.lr": "(0, 10]",
    "base.betas": "[0, 1)",
    "base.weight_decay": "[0, 10]",
    "base.eps": "(0, 1]",
    "base.encoder_lr": "[0, 10]",
    "base.lr_drop_at": "(0, 1]",  # fractions of the iterations
    "base.lr_drop": "(0, 1]",
    "aligner.iters": "[0, 10000000]",  # >= 1 when the aligner is trained (see validate)
    "aligner.batch_size": "[1, 4096]",
    "aligner.lr": "(0, 10]",
    "aligner.momentum": "[0, 1)",
    "aligner.weight_decay": "[0, 10]",
    "aligner.dropout": "[0, 1)",
    "aligner.hidden": "[1, 4096]",
    "aligner.convs": "[0, 2]",
    "aligner.linears": "[1, 3]",
    "aligner.smooth_l1_alpha": "(0, 1000000]",
    "aligner.neighbours": "[2, 10000]",  # a mean and a spread of the neighbours' scores
    "aligner.distance_weight": "[0, 100]",
}


def _in_range(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _is(value, kind) -> bool:
    """Whether `value` has the annotated type `kind` (int, float, bool, str, None, tuple[...], list[...], unions).
    Numbers must be finite; a bool is not a number and an int is a float, as in JSON."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    items = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(items) and all(map(_is, value, items))
    if typing.get_origin(kind) is list:
        return isinstance(value, (tuple, list)) and all(_is(item, items[0]) for item in value)
    raise TypeError(f"no check for settings of type {kind}")  # a new kind of field: teach _is about it


def _describe(kind) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    items = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return f"a list of {len(items)} finite numbers"
    if typing.get_origin(kind) is list:
        return "a list of finite numbers"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "None"}[
        kind
    ]


def _numbers(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [] if value is None or isinstance(value, (bool, str)) else [value]


def _check_fields(block, prefix: str) -> None:
    """Type (from the annotation) and range (from RANGES) of every field of a settings dataclass, recursively."""
    kinds = typing.get_type_hints(type(block))
    own_ranges = getattr(type(block), "RANGES", {})
    for item in dataclasses.fields(block):
        if item.name == "method_blocks":
            continue  # checked by Settings.validate against the registry
        name, value, kind = prefix + item.name, getattr(block, item.name), kinds[item.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__} block, got {shown(value)}")
            _check_fields(value, name + ".")
            continue
        interval = RANGES.get(name) or own_ranges.get(item.name)
        if not _is(value, kind) or (interval and not all(_in_range(number, interval) for number in _numbers(value))):
            within = f" in {interval}" if interval else ""
            raise ValueError(f"{name} must be {_describe(kind)}{within}, got {shown(value)}")


def _from_dict(cls, data, prefix: str):
    """A settings dataclass from a dict, nested blocks included; JSON lists become the tuples the fields hold."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'settings'} must be a mapping of names to values, got {shown(data)}")
    known = {item.name: item for item in dataclasses.fields(cls) if item.name != "method_blocks"}
    block_kinds = {}
    if cls is Settings:  # the method blocks, by method name
        block_kinds = {name: METHODS[name].options for name in METHODS if METHODS[name].options is not None}
    unknown = set(data) - set(known) - set(block_kinds)
    if unknown:
        names = sorted(prefix + str(name) for name in unknown)  # YAML keys may be null or numbers
        known_names = sorted(prefix + name for name in {*known, *block_kinds})
        raise ValueError(f"unknown settings {shown(names)}; known: {known_names}")
    kinds = {**typing.get_type_hints(cls), **block_kinds}
    values: dict[str, Any] = {}
    blocks = {}
    for name, value in data.items():
        kind = kinds[name]
        if dataclasses.is_dataclass(kind):
            value = _from_dict(kind, value, prefix + name + ".")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        if name in block_kinds:
            blocks[name] = value
        else:
            values[name] = value
    made = cls(**values)
    if blocks:
        made.method_blocks.update(blocks)
    return made


# What `cada train` and `Detector()` run unless told: on realmix, realmix-extra and their mix it ranked every
# product's anomalies as well as RevDist or better, and pooled higher (docs/results/default-method.md).
# `Settings()` itself holds the paper's RevDist.
DEFAULT_METHOD = "revdist-patchcore"


def preset(name: str, method: str = DEFAULT_METHOD) -> Settings:
    """The settings of `method` under preset `name`.

    `paper`: the paper's schedule (Sec. 4.2; a GPU job): fixed iterations as the paper trains RevDist, ReContrast
    and UniAD on every data set, DRAEM's and CFA's reference epochs. `cpu`: EfficientNet-Lite0, batch 16, 8 passes
    over the training images and at least 400 iterations (DRAEM, CFA: 400 iterations of 8 / 4), sized for 2 CPU
    cores; RevDist reads EfficientNet-Lite2. PatchCore trains no weights (its fit is one pass that ignores iters and
    lr); `paper` gives it wide_resnet50_2 at 256 px, `cpu` Lite0.

    A method's registered hooks say what is its own: "paper" (its schedule, the start of both presets), then under
    `cpu` the common changes above and its "cpu" hook.
    """
    if name not in ("cpu", "paper"):
        raise ValueError(f"unknown preset {name!r}; choose 'cpu' or 'paper'")
    entry = METHODS[method]  # "unknown method ...; choose one of ..."
    settings = Settings(method=method)
    if "paper" in entry.presets:  # the method's own schedule
        entry.presets["paper"](settings)
    if name == "cpu":
        # Lite0 has B4's stage structure (strides 2-16), so UniAD keeps its shape and its 224 px input (a method's
        # "cpu" hook may choose another encoder: RevDist reads Lite2).
        settings.backbone = "efficientnet_lite0"
        # 8 passes over the training images in steps of 16, at least 400 steps (docs/results/base-methods.md):
        # more passes did not help 6 products mixed, and a small set fell short with fewer than 400 steps.
        # Mixes of up to 800 images get 400 steps, larger ones 8 passes.
        settings.base.iters, settings.base.epochs, settings.base.min_iters = None, 8, 400
        settings.base.batch_size = 16
        settings.aligner.iters = 1000
        if "cpu" in entry.presets:  # the method's changes to the cpu preset
            entry.presets["cpu"](settings)
    return settings
