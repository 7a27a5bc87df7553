"""`cada predict`: its arguments, the output folder checked before any work; cada.predict scores."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from cada.commands.options import QUIET, add_device_options, positive_int
from cada.files import check_output, printable
from cada.workflows import run_files


def _check_predict_out(out: Path, model: Path, paths: list[str], overwrite: bool) -> None:
    """Before any scoring: OUT must not hold or overlap the inputs or the model, and earlier predictions there
    are replaced only with --overwrite (then their overlays and masks go, so old and new never mix)."""
    from cada.engine.distributed import is_distributed, is_main
    from cada.predict import EXPORTED_SUFFIXES
    from cada.runtime import sidecar_path

    model_files = (
        [model, model.with_suffix(".bin"), sidecar_path(model)]
        if model.suffix in EXPORTED_SUFFIXES
        else run_files(model)
    )
    check_output(out, "--out", "folder", inputs=paths, protected=model_files)
    earlier = [name for name in ("predictions.csv", "predictions.json", "overlays", "masks") if (out / name).exists()]
    if earlier and not overwrite:
        raise ValueError(
            f"--out {printable(out)} holds earlier predictions ({', '.join(earlier)}): choose another "
            "folder, or add --overwrite to replace them"
        )
    if earlier and is_main():
        for folder in ("overlays", "masks"):
            if (out / folder).is_dir():
                shutil.rmtree(out / folder)
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()  # no process writes before rank 0 has cleared the old overlays


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run folder, or an exported model (.onnx, or OpenVINO .xml)")
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for predictions.csv/.json (and overlays, masks)")
    parser.add_argument("--overlays", action="store_true", help="write a heatmap overlay PNG per image")
    parser.add_argument("--masks", action="store_true", help="write a binary mask PNG per image (map >= threshold)")
    point = parser.add_mutually_exclusive_group()
    point.add_argument(
        "--fpr",
        type=float,
        help="decide at this false-positive rate, chosen now over the calibration "
        "scores stored in the run (no recalibration)",
    )
    point.add_argument("--threshold", type=float, help="decide at this aligned-score threshold")
    parser.add_argument(
        "--output-size",
        choices=("original", "model"),
        default="original",
        help="write overlays and masks at each image's own size (default; the map upsampled "
        "bilinearly) or at the model's input size",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier predictions in --out (their overlays and masks are removed)",
    )
    add_device_options(parser)


def run(args) -> int:
    from cada.engine.distributed import init_distributed, is_main
    from cada.predict import load_model, predict_paths

    init_distributed()  # under torchrun: the images are shared out over the processes, rank 0 writes the results

    target = Path(args.model)
    out = Path(args.out)
    _check_predict_out(out, target, args.paths, args.overwrite)
    model = load_model(target, args.fpr, args.threshold, args.device, args.precision)
    if is_main():
        if model.threshold is None:
            print("note: the run has no threshold yet (cada calibrate); scores only, no decisions", file=sys.stderr)
        else:
            print(f"threshold {model.threshold:.4f}, {model.threshold_source}")
    summary = predict_paths(
        model.scorer,
        model.image_size,
        model.threshold,
        args.paths,
        args.out,
        args.overlays,
        args.masks,
        args.batch_size,
        not args.quiet,
        model.description,
        args.output_size,
        model.resize,
    )
    if not is_main():
        return 0
    for message in summary["skipped"]:
        print(f"skipped: {message}", file=sys.stderr)
    if summary.get("n_unfamiliar"):
        print(
            f"{summary['n_unfamiliar']} images lie far from every training image (column unfamiliar): likely a "
            "product the run was not trained on, whose scores mean little",
            file=sys.stderr,
        )
    print(
        f"{summary['n_images']} images, {summary['n_anomalous']} anomalous, {len(summary['skipped'])} skipped; "
        f"{summary['images_per_second']} images/s; wrote {Path(args.out) / 'predictions.csv'}"
    )
    return 0
