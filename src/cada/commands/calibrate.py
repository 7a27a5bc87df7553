"""`cada calibrate`: its arguments, and the threshold it chose printed."""

from __future__ import annotations

import argparse

from cada.commands.options import add_data_options, add_device_options, cache_dir_of
from cada.workflows import calibrate, describe_calibration


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder; the threshold is stored in it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--normal", nargs="+", help="folders of held-out normal images (not the test set)")
    source.add_argument("--val", help="labelled validation data (its test split): F1-optimal threshold")
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false-positive rate on new normal images, with --normal"
    )
    add_data_options(parser)
    add_device_options(parser)


def run(args) -> int:
    calibration, previous = calibrate(
        args.run,
        normal=args.normal or (),
        val=args.val,
        fpr=args.fpr,
        format=args.format,
        cache_dir=cache_dir_of(args),
        device=args.device,
        precision=args.precision,
    )
    print(describe_calibration(calibration))
    print(
        f"kept the {len(calibration['normal_scores'])} normal calibration scores in the run: "
        "`cada predict --fpr F` decides at another false-positive rate without recalibrating"
    )
    if previous:
        print(f"replaced the previous threshold {previous['threshold']:.4f} ({previous['how']}, {previous['source']})")
    return 0
