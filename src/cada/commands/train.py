"""`cada train`: its arguments, and `--devices N`, which runs the same command under torchrun."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from cada.commands.options import add_training_options, cache_dir_of, settings_of
from cada.config import Settings
from cada.registry import ALIGNERS
from cada.workflows import train


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


def arguments(parser: argparse.ArgumentParser) -> None:
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
    add_training_options(parser)


def run(args) -> int:
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
        settings_of(args),
        Path(args.data),
        Path(args.out),
        weights=args.weights,
        progress=not args.quiet,
        holdout=args.holdout,
        fpr=args.fpr,
        format=args.format,
        cache_dir=cache_dir_of(args),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        resume_hint=hint,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        logger=args.logger,
    )
    return 0
