"""The command line: `COMMANDS` is the table of `cada`'s commands, each with its help line, the function that adds
its arguments and the one that runs it; a new command is one entry (and its two functions). The commands parse
and print; the work is in cada.workflows (train, evaluate, calibrate, ablate, demo) and the modules they call
(predict, export, serve, weights). `main` turns bad input into one line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from cada.config import DEFAULT_METHOD, RESIZE_MODES, Settings
from cada.files import check_output, os_error, printable
from cada.registry import ALIGNERS, METHODS
from cada.workflows import (
    LOGGERS,
    ablate,
    calibrate,
    demo,
    describe_calibration,
    evaluate,
    find_split,
    run_files,
    settings_from_options,
    train,
)

QUIET = "no progress bars"


def _settings_from_args(args) -> Settings:
    return settings_from_options(vars(args))


def _cache_dir(args):
    return None if getattr(args, "no_cache", False) else "auto"


def synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-test-defect", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def cmd_synth(args) -> int:
    from cada.data.synthetic import generate_dataset

    root = generate_dataset(
        args.out,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote synthetic data set to {root}")
    return 0


def _without_devices(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            kept.append(arg)
    return kept


def launch_processes(devices: int, argv: list[str]) -> int:
    """`cada train --devices N ...`: the same command under torchrun (standalone rendezvous), N processes here."""
    import subprocess

    import torch

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={devices}",
        "-m",
        "cada",
        *_without_devices(argv),
    ]
    backend = "nccl for GPU tensors, gloo for CPU tensors" if torch.cuda.is_available() else "gloo (CPUs)"
    print(f"launching {devices} processes ({backend}): torchrun {' '.join(command[3:])}", flush=True)
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    process = subprocess.Popen(command, env=environment)
    # Ctrl-C reaches the training processes themselves (they checkpoint and stop); SIGTERM is passed on.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM)),
    }
    try:
        return process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data root in the MVTec AD layout")
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="hold out this fraction of each class's training images to calibrate the threshold",
    )
    parser.add_argument(
        "--fpr",
        type=float,
        default=0.01,
        help="target false-positive rate on new normal images, for --holdout calibration",
    )
    parser.add_argument(
        "--align",
        choices=ALIGNERS,
        help="cada: the paper's (u, gamma) regressor; cada-sigma: (u, sigma); cada-score: gamma = the "
        "image score; knn: the k nearest "
        "training images give the z-score (and flag unfamiliar products); knn-distance: knn plus how far the "
        "image is from its nearest training image; distance-only: the base map as it is plus knn-distance's "
        "term (for revdist-patchcore, whose map is aligned already); class-aware: CaDA-A, "
        "needs class names at test (a reference); classifier: CaDA-B; none: the base alone "
        f"(default: the config's, else the method's: {Settings.align}, patchcore knn, revdist-patchcore "
        "distance-only)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        metavar="K",
        help="write a checkpoint to OUT/resume every K training steps (0: only when interrupted)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUT/resume (same settings), skipping finished stages",
    )
    parser.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train in N processes (DistributedDataParallel): launches torchrun --nproc_per_node N; with CUDA "
        "each process takes its own GPU (--device auto)",
    )
    parser.add_argument(
        "--scale-lr",
        action="store_true",
        help="multi-process: multiply the learning rates by the process count (default: unscaled; "
        "the effective batch is the batch x the process count either way)",
    )
    _add_training_options(parser)


def cmd_train(args) -> int:
    from cada.engine.distributed import init_distributed, world_size

    argv = list(getattr(args, "argv", None) or [])
    if args.devices is not None:
        if args.devices < 1:
            raise ValueError(f"--devices must be at least 1, got {args.devices}")
        if "RANK" in os.environ:
            raise ValueError("--devices launches torchrun itself: do not use it under torchrun")
        if args.devices > 1:
            return launch_processes(args.devices, argv)
    init_distributed()
    command = " ".join(shlex.quote(a) for a in _without_devices(argv) if a != "--resume")
    hint = f"torchrun --nproc_per_node={world_size()} -m cada {command}" if world_size() > 1 else f"cada {command}"
    train(
        _settings_from_args(args),
        Path(args.data),
        Path(args.out),
        weights=args.weights,
        progress=not args.quiet,
        holdout=args.holdout,
        fpr=args.fpr,
        format=args.format,
        cache_dir=_cache_dir(args),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        resume_hint=hint,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        logger=args.logger,
    )
    return 0


def calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder; the threshold is stored in it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--normal", nargs="+", help="folders of held-out normal images (not the test set)")
    source.add_argument("--val", help="labelled validation data (its test split): F1-optimal threshold")
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false-positive rate on new normal images, with --normal"
    )
    _add_data_options(parser)
    _add_device_options(parser)


def cmd_calibrate(args) -> int:
    calibration, previous = calibrate(
        args.run,
        normal=args.normal or (),
        val=args.val,
        fpr=args.fpr,
        format=args.format,
        cache_dir=_cache_dir(args),
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


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder")
    parser.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx (onnxruntime), or openvino: OpenVINO IR, OUT.xml with OUT.bin (needs the openvino package)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the .onnx (or .xml) file to write (threshold and preprocessing: .json beside it)",
    )
    parser.add_argument(
        "--input",
        choices=("resized", "raw"),
        default="resized",
        help="resized: uint8 NCHW batches already resized to the run's image size (cada.data.resize's rule); raw: "
        "one uint8 H x W x 3 RGB image of any size, resized inside the graph by the same rule, to the last bit",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .json)")


def cmd_export(args) -> int:
    from cada.api import Detector
    from cada.export import export_onnx, export_openvino
    from cada.runtime import sidecar_path

    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise ValueError('ONNX export needs the onnx package: pip install -e ".[export]"') from None
    if args.input == "raw":
        try:
            import onnxscript  # noqa: F401 - torch.export's ONNX translation (the raw graph's resize) needs it
        except ImportError:
            raise ValueError('--input raw needs the onnxscript package: pip install -e ".[export]"') from None
    if args.format == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ValueError("--format openvino needs the openvino package: pip install openvino") from None
    protected = run_files(args.run)
    out = Path(args.out)
    outputs = [(out, "--out"), (sidecar_path(out), "--out's sidecar")]
    if args.format == "openvino":
        outputs.append((out.with_suffix(".bin"), "--out's weights"))
    for path, option in outputs:
        check_output(path, option, "file", protected=protected, overwrite=args.overwrite)
    detector = Detector.load(args.run, device="cpu")
    if args.format == "openvino":
        export_openvino(detector, out, input=args.input)
    else:
        export_onnx(detector, out, input=args.input)
    print("wrote " + ", ".join(str(path) for path, _ in outputs))
    return 0


def predict_arguments(parser: argparse.ArgumentParser) -> None:
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
    _add_device_options(parser)


def cmd_predict(args) -> int:
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


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run folder, or an exported model (.onnx, or OpenVINO .xml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument(
        "--max-request-mb", type=float, default=32.0, help="largest request body accepted, in MiB (larger: 413)"
    )
    parser.add_argument(
        "--max-request-megapixels",
        type=float,
        default=100.0,
        help="the most pixels all images of one request may hold together, from their headers (more: 413)",
    )
    parser.add_argument("--workers", type=positive_int, default=1, help="processes, each with the model loaded")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per forward pass: concurrent requests share one"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first queued image waits for others to share its forward pass",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="images waiting for the model at most; a request beyond gets 503 with Retry-After",
    )
    point = parser.add_mutually_exclusive_group()
    point.add_argument(
        "--fpr", type=float, help="decide at this false-positive rate, over the stored calibration scores"
    )
    point.add_argument("--threshold", type=float, help="decide at this aligned-score threshold")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    _add_device_options(parser)


def cmd_serve(args) -> int:
    import json
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from cada.predict import load_model
    from cada.serve import ENVIRONMENT, Limits, Service, create_app, server_config

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535 (0: any free port), got {args.port}")
    if not 0 < args.max_request_mb <= 4096:
        raise ValueError(f"--max-request-mb must be in (0, 4096], got {args.max_request_mb}")
    if not 0 < args.max_request_megapixels <= 100_000:
        raise ValueError(f"--max-request-megapixels must be in (0, 100000], got {args.max_request_megapixels}")
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_request_pixels=int(args.max_request_megapixels * 1_000_000),
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    ).check()
    model = load_model(args.model, args.fpr, args.threshold, args.device, args.precision)  # bad input: one line now
    try:  # bound here: a port in use is one line, and port 0's choice is known
        listening = socket.create_server((args.host, args.port), backlog=2048)
    except OSError as error:  # the port is taken, the address is not this machine's, a port below 1024...
        raise ValueError(f"cannot listen on {args.host} port {args.port}: {error.strerror or error}") from None
    host, port = listening.getsockname()[:2]
    print(
        f"serving {printable(args.model)} on http://{host}:{port}/ (POST /predict, GET /health/ready, GET /metrics) "
        f"with {args.workers} worker(s); "
        + (
            "no threshold: scores only"
            if model.threshold is None
            else f"threshold {model.threshold:.4f}, {model.threshold_source}"
        ),
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("note: the server has no authentication; anyone who can reach this address can use it", file=sys.stderr)
    if args.workers == 1:
        server = uvicorn.Server(
            server_config(create_app(Service(model, str(args.model), limits)), host, port, args.quiet)
        )
        server.run(sockets=[listening])
    else:  # each worker process loads the model itself (uvicorn's supervisor restarts a worker that dies)
        from dataclasses import asdict

        os.environ[ENVIRONMENT] = json.dumps(
            {
                "model": str(args.model),
                "fpr": args.fpr,
                "threshold": args.threshold,
                "device": args.device,
                "precision": args.precision,
                "limits": asdict(limits),
                "threads": max(1, (os.cpu_count() or 1) // args.workers),
            }
        )
        os.environ["CADA_SERVE_WORKERS"] = str(args.workers)
        with tempfile.TemporaryDirectory(prefix="cada-metrics-") as metrics:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # every worker's metrics, summed at /metrics
            config = server_config("cada.serve:app_from_environment", host, port, args.quiet, workers=args.workers)
            Multiprocess(config, sockets=[listening]).run()
    print("stopped", flush=True)
    return 0


def weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "download"), nargs="?", default="list")
    parser.add_argument("names", nargs="*", metavar="NAME", help="encoders to download (see `cada weights list`)")


def cmd_weights(args) -> int:
    from cada.weights import download, status

    if args.action == "download":
        for name in args.names:
            print(f"{name}: {download(name)}")
        return 0
    for name, path, origin in status():
        print(f"{name:26s} {printable(path) if path else 'missing'}  ({origin})")
    return 0


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder written by `cada train`")
    parser.add_argument("--data", help="data root (its test split is used)")
    _add_data_options(parser)
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
    _add_device_options(parser)


def cmd_evaluate(args) -> int:
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
        cache_dir=_cache_dir(args),
        report_dir=args.report,
        pixel_resolution=args.pixel_resolution,
    )
    return 0


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="cada-demo", help="folder for the run and results.json")
    parser.add_argument("--iters", type=positive_int, help="base training iterations (default: the cpu preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    _add_device_options(parser)


def cmd_demo(args) -> int:
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


def ablate_arguments(parser: argparse.ArgumentParser) -> None:
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
    _add_training_options(parser)
    parser.set_defaults(align="none")


def cmd_ablate(args) -> int:
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


def _add_data_options(parser: argparse.ArgumentParser) -> None:
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


def _add_training_options(parser: argparse.ArgumentParser) -> None:
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
    _add_data_options(parser)
    _add_device_options(parser)


def _add_device_options(parser: argparse.ArgumentParser) -> None:
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


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (as every other error) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One command of `cada`: its name and one-line help, what adds its arguments, and what runs it (a workflow
    of cada.workflows, or the module it names)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("demo", "train and evaluate the default method on synthetic products", demo_arguments, cmd_demo),
    Command("synth", "write the synthetic data set in the MVTec AD layout", synth_arguments, cmd_synth),
    Command("train", "train one model on the normal images of all classes mixed", train_arguments, cmd_train),
    Command("calibrate", "choose the one decision threshold of a run", calibrate_arguments, cmd_calibrate),
    Command("predict", "score images of any product: no class names, no layout", predict_arguments, cmd_predict),
    Command("export", "one graph: image -> aligned map and image score (ONNX, OpenVINO)", export_arguments, cmd_export),
    Command(
        "ablate",
        "the paper's Tables 3-5: train the base (revdist unless told) once, then every aligner",
        ablate_arguments,
        cmd_ablate,
    ),
    Command("serve", "an HTTP API and a web page that score images (docs/serving.md)", serve_arguments, cmd_serve),
    Command(
        "weights",
        "which encoders' ImageNet weights are here; download the missing ones (needs internet)",
        weights_arguments,
        cmd_weights,
    ),
    Command("evaluate", "absolute-unified and model-unified metrics of a run", evaluate_arguments, cmd_evaluate),
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cada",
        description="One anomaly detector for every product on a line: one model, no class names, one threshold.",
        epilog="cada COMMAND --help for a command's options; the README and docs/ for more.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--verbose", action="store_true", help="also the details: resolved settings, threads")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        arguments = commands.add_parser(command.name, help=command.help)
        command.arguments(arguments)
        arguments.set_defaults(func=command.run)
    return parser


def warning_line(command: str):
    """A `warnings.formatwarning` that writes a warning as the errors are written: one line, no source path."""

    def formatted(message, category, filename, lineno, line=None) -> str:
        return f"cada {command}: warning: {printable(message)}\n"

    return formatted


class ConsoleHandler(logging.Handler):
    """The library's log on the console: progress lines and results as they are on stdout, warnings and errors as
    one line on stderr, written to the streams of the moment (so that a caller's redirection holds)."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        message = printable(record.getMessage())
        if record.levelno >= logging.WARNING:
            print(f"cada {self.command}: {record.levelname.lower()}: {' '.join(message.split())}", file=sys.stderr)
        else:
            print(message, flush=True)


def console_logging(command: str, verbose: bool) -> Callable[[], None]:
    """Show the "cada" logger on the console, on rank 0 only under torchrun (the other processes: warnings and
    errors): what the library says at INFO, with --verbose its details too. Returns what undoes it."""
    from cada.engine.distributed import is_main

    library = logging.getLogger("cada")
    before = (library.level, library.propagate)
    handler = ConsoleHandler(command)
    library.setLevel(logging.WARNING if not is_main() else logging.DEBUG if verbose else logging.INFO)
    library.addHandler(handler)
    library.propagate = False

    def undo() -> None:
        library.removeHandler(handler)
        library.level, library.propagate = before

    return undo


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage mistake, said in one line by Parser.error (2)
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = argv
    format_warning, warnings.formatwarning = warnings.formatwarning, warning_line(args.command)
    undo_logging = console_logging(args.command, args.verbose)
    try:
        return args.func(args)
    except (OSError, ValueError, SafetensorError) as error:
        # Bad input (and a file system that refuses) gets one clear line, not a traceback; real bugs still raise.
        if args.debug:
            raise
        message = os_error(error) if isinstance(error, OSError) else str(error)
        print(f"cada {args.command}: error: {printable(' '.join(message.split()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # TrainingInterrupted says where its checkpoint is and how to resume
        print(f"cada {args.command}: {error or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning
        undo_logging()


if __name__ == "__main__":
    raise SystemExit(main())
