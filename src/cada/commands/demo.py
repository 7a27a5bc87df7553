"""`cada demo`: its arguments; the work is cada.workflows.demo."""

from __future__ import annotations

import argparse

from cada.commands.options import QUIET, add_device_options, positive_int
from cada.workflows import demo


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="cada-demo", help="folder for the run and results.json")
    parser.add_argument("--iters", type=positive_int, help="base training iterations (default: the cpu preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    add_device_options(parser)


def run(args) -> int:
    demo(
        args.out,
        seed=args.seed,
        iters=args.iters,
        progress=not args.quiet,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
    )
    return 0
