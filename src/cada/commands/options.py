"""What several commands share: data, training and device options, and the argument types."""

from __future__ import annotations

import argparse

from cada.config import DEFAULT_METHOD, RESIZE_MODES, Settings
from cada.registry import METHODS
from cada.workflows import LOGGERS, settings_from_options

QUIET = "no progress bars"


def settings_of(args) -> Settings:
    return settings_from_options(vars(args))


def cache_dir_of(args):
    return None if getattr(args, "no_cache", False) else "auto"


def add_data_options(parser: argparse.ArgumentParser) -> None:
    from cada.data.layouts import formats

    parser.add_argument(
        "--format",
        choices=formats(),
        default="auto",
        help="data layout (default: recognised from the folder, and said which)",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="decode every image again instead of using the "
        "on-disk cache of decoded images ($CADA_CACHE_DIR, default ~/.cache/cada)",
    )


def positive_int(text: str) -> int:
    """argparse type of iteration counts: 0 would mean "no training", which is never what a user wants."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type of pass counts: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument(
        "--method", choices=METHODS, help=f"base method (default: the --config file's, else {DEFAULT_METHOD})"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings from a YAML or JSON file (partial or whole; a "
        "run's config.json is one), over the preset's; the options here override it",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any setting by its dotted name, last of all, e.g. --set base.lr=1e-3 --set "
        "patchcore.coreset_ratio=0.05 (repeatable; validated as the settings are)",
    )
    parser.add_argument("--backbone", help="encoder name (default: the preset's)")
    parser.add_argument("--weights", help="local encoder weights file (.pth or .safetensors)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        help="how images fit the square input: squash (each axis resized; the default) or letterbox (aspect ratio "
        "kept, padded); recorded in the run and used for all its predictions",
    )
    parser.add_argument(
        "--tile",
        type=int,
        metavar="N",
        help="for large images with small defects: cut each image into N x N tiles of --image-size (the image "
        "fitted to a larger square first), train and score the tiles, combine their results per image "
        "(default: 1, no tiles)",
    )
    parser.add_argument(
        "--tile-overlap", type=float, metavar="F", help="with --tile: the fraction of a tile its neighbour shares"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--iters", type=positive_int, help="base training iterations (default: the preset's)")
    length.add_argument(
        "--epochs",
        type=positive_float,
        help="base training passes over the training images, "
        "resolved to ceil(epochs x images / batch) iterations (default: the preset's)",
    )
    parser.add_argument("--align-iters", type=positive_int, help="aligner training iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's, else 0)")
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in --out, once the new one is complete"
    )
    parser.add_argument(
        "--logger",
        choices=LOGGERS,
        default="csv",
        help="the per-step training log saved with the run: csv (RUN/train_log.csv) or tensorboard (that, and "
        "TensorBoard scalars in RUN/tensorboard; needs the tensorboard package)",
    )
    add_data_options(parser)
    add_device_options(parser)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where the networks run: auto (a GPU when CUDA is available, under torchrun LOCAL_RANK's; else the "
        "CPU), cpu, cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="the networks' forward passes: auto (bf16 on GPUs that support it, else fp32), fp32, bf16 or fp16 "
        "(maps, aligner and metrics stay fp32)",
    )
