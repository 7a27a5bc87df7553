"""`cada evaluate`: its arguments; the work is cada.workflows.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from cada.commands.options import QUIET, add_data_options, add_device_options, cache_dir_of
from cada.files import check_output
from cada.workflows import evaluate, find_split, run_files


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder written by `cada train`")
    parser.add_argument("--data", help="data root (its test split is used)")
    add_data_options(parser)
    parser.add_argument("--normal", nargs="+", help="with --format folder: folders of normal test images")
    parser.add_argument("--anomalous", nargs="+", help="with --format folder: folders of anomalous test images")
    parser.add_argument("--masks", nargs="+", help="with --format folder: mask folders (matched by file stem)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plots", help="folder for score_distributions.png (per class, before/after alignment)")
    parser.add_argument("--report", help="folder for report.html: tables, score distributions, image gallery")
    parser.add_argument(
        "--pixel-resolution",
        choices=("model", "original"),
        default="model",
        help="compare maps and masks at the model's input size (default) or at each mask's own "
        "size, maps upsampled bilinearly (exact; 4 bytes per normal pixel of memory)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --json file and non-empty --plots/--report folders",
    )
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    add_device_options(parser)


def run(args) -> int:
    from cada.api import Detector
    from cada.data.folder import folder_samples
    from cada.engine.distributed import init_distributed, is_main

    init_distributed()  # under torchrun: the test set is sharded over the processes, results on rank 0

    # The outputs are checked before the evaluation, which may take long.
    inputs = [args.data] if args.data else [*(args.normal or ()), *(args.anomalous or ()), *(args.masks or ())]
    for option, value, kind in (
        ("--json", args.json, "file"),
        ("--plots", args.plots, "folder"),
        ("--report", args.report, "folder"),
    ):
        if value:
            check_output(value, option, kind, inputs=inputs, protected=run_files(args.run), overwrite=args.overwrite)
    detector = Detector.load(args.run, device=args.device, precision=args.precision)
    if args.format == "folder":
        if not (args.normal and args.anomalous):
            raise ValueError("--format folder needs --normal DIR... and --anomalous DIR... (and optionally --masks)")
        samples = folder_samples(args.normal, args.anomalous, args.masks or ())
    else:
        if not args.data:
            raise ValueError("give --data ROOT, or --format folder with --normal/--anomalous folders")
        samples = find_split(args.data, "test", args.format, quiet=not is_main())
    evaluate(
        detector,
        Path(args.data or args.anomalous[0]),
        args.json,
        progress=not args.quiet,
        plots_dir=args.plots,
        samples=samples,
        cache_dir=cache_dir_of(args),
        report_dir=args.report,
        pixel_resolution=args.pixel_resolution,
    )
    return 0
