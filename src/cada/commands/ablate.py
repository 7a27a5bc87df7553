"""`cada ablate`: its arguments; the work is cada.workflows.ablate."""

from __future__ import annotations

import argparse

from cada.commands.options import add_training_options
from cada.workflows import ablate, settings_from_options


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data root in the MVTec AD layout")
    parser.add_argument("--out", required=True, help="folder for the base run and ablation.json")
    parser.add_argument("--run", help="reuse this trained run as the base instead of training one")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="also train a base on a noisy training set: this fraction of each class's anomalous "
        "test images moved into training, and compare (u, gamma) with (u, sigma) on it",
    )
    add_training_options(parser)
    parser.set_defaults(align="none")


def run(args) -> int:
    # the paper's tables study its aligners on RevDist (the default method aligns its own map)
    settings = settings_from_options(vars(args), default_method="revdist")
    ablate(
        args.data,
        args.out,
        settings,
        run=args.run,
        weights=args.weights,
        noise=args.noise,
        format=args.format,
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        logger=args.logger,
    )
    return 0
