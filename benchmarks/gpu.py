"""RevDist with wide_resnet50_2 (the paper preset) on a CUDA GPU: inference and training speed, peak memory.

    python benchmarks/gpu.py [--device cuda] [--batches 10] [--paper-run DATA_ROOT --out RUN]

Prints the device, then inference images/s of the whole detector path (encoder, decoder, map, smoothing, image
score, CADA statistics; `Detector.infer`) at batch 16 and 64 in fp32 and bf16, and training steps/s and images/s
of the paper preset's base training step (batch 16: decoder and bottleneck on cached encoder features, as
`cada train` runs it), with the peak GPU memory of each. Random weights: speed does not depend on them (and
wide_resnet50_2's ImageNet weights are not needed). `--paper-run ROOT` then trains the whole paper recipe
(`cada train --preset paper --method revdist --align cada`: 5000 + 5000 iterations of 16) on ROOT into --out
and prints its wall time.
Without CUDA it says so and exits 0 (`--device cpu` runs it on the CPU anyway: a check of the script itself,
e.g. with `--backbone efficientnet_lite0 --batches 1`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float:
    from cada.engine.device import peak_memory_gib

    return peak_memory_gib(device) or float("nan")


def inference(detector, device: torch.device, batch: int, batches: int) -> tuple[float, float]:
    """(images/s, peak GiB) of Detector.infer at this batch size."""
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    detector.infer(images)  # warm-up: kernel choice
    synchronize(device)
    reset_peak(device)
    started = time.perf_counter()
    for _ in range(batches):
        detector.infer(images)
    synchronize(device)
    return batch * batches / (time.perf_counter() - started), peak(device)


def training(detector, device: torch.device, steps: int) -> tuple[float, float]:
    """(steps/s, peak GiB) of the base training step at batch 16 in the detector's precision."""
    from cada.engine import Trainer, make_optimizer

    settings = detector.settings.base.resolved(64)
    images = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8)
    trainer = Trainer(progress=False, device=device, precision=detector.precision)
    method = detector.method
    groups, loss_of = method.objective(images, settings, torch.Generator().manual_seed(0), 4.0, trainer)
    optimizer = make_optimizer(groups, settings)
    method.train()
    batch = torch.arange(16)
    for step in range(steps + 1):
        if step == 1:  # the first step is warm-up
            synchronize(device)
            reset_peak(device)
            started = time.perf_counter()
        with trainer.autocast():
            loss = loss_of(step, batch).float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    method.eval()
    return steps / (time.perf_counter() - started), peak(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--backbone", default="wide_resnet50_2", help="encoder (default: the paper preset's)")
    parser.add_argument("--paper-run", type=Path, help="data root: also train the whole paper recipe on it")
    parser.add_argument("--out", type=Path, help="with --paper-run: the run folder to write")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.device != "cpu":
        print("no CUDA device here (torch.cuda.is_available() is False): nothing to measure")
        return 0
    from cada import Detector
    from cada.config import preset
    from cada.engine.device import device_name, resolve_device

    device = resolve_device(args.device)
    print(f"device: {device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.backends.cudnn.benchmark = True
    settings = preset("paper", "revdist")
    settings.backbone = args.backbone
    settings.align = "cada"  # the paper's regressor: its statistics need no training set (knn's do)
    print(f"{'precision':>9} {'batch':>5} {'infer img/s':>12} {'peak GiB':>9}")
    for precision in ("fp32", "bf16"):
        detector = Detector(settings, pretrained=False, device=device, precision=precision)
        detector.fitted = True  # timing only
        for batch in (16, 64):
            speed, peak = inference(detector, device, batch, args.batches)
            print(f"{precision:>9} {batch:5d} {speed:12.1f} {peak:9.2f}")
    print(f"{'precision':>9} {'train steps/s':>14} {'img/s':>7} {'peak GiB':>9}  (batch 16, paper preset)")
    for precision in ("fp32", "bf16"):
        detector = Detector(settings, pretrained=False, device=device, precision=precision)
        rate, peak = training(detector, device, args.batches)
        print(f"{precision:>9} {rate:14.2f} {16 * rate:7.1f} {peak:9.2f}")
    if args.paper_run:
        if args.out is None:
            parser.error("--paper-run needs --out RUN")
        from cada.workflows import evaluate, train

        started = time.perf_counter()
        detector = train(settings, args.paper_run, args.out, device=str(device))
        trained = time.perf_counter() - started
        evaluate(detector, args.paper_run, args.out / "results.json")
        total = time.perf_counter() - started
        print(f"paper recipe on {args.paper_run}: trained in {trained:.0f} s, with evaluation {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
