"""Inference and training speed of RevDist + CADA on this machine, and peak memory.

    python benchmarks/speed.py [--threads 2] [--batches 5]
    python benchmarks/speed.py --compare-anomalib [--rounds 5] [--threads 2]   # needs anomalib installed

Inference: the whole detector path (encoder, decoder, map, smoothing, image score, CADA statistics), batch 16
of 256x256 images under torch.inference_mode. Training: base-method iterations (batch 16) on features of the
frozen encoder, the way `cada train` runs them, plus the cost of encoding the training images once.
Random weights: speed does not depend on them. Each backbone runs in its own process so peak memory is its own.

--compare-anomalib: RevDist with wide_resnet50_2 against anomalib's Reverse Distillation torch model, in one
process, round-robin (each round times one batch of 16 of each, in turn), random weights. cada: `Detector.infer`
(normalisation, encoder, decoder, map, Gaussian smoothing, top-1% image score, CADA's statistics), in fp32 and in
bf16 (`--precision bf16`); anomalib: normalisation and its model's forward (map with its 33x33 Gaussian blur,
max score), fp32. Prints each round's images/s and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

BACKBONES = ("efficientnet_lite0", "wide_resnet50_2")


def measure(backbone: str, threads: int, batches: int) -> None:
    import torch

    from cada import Detector
    from cada.config import preset
    from cada.data.dataset import normalize
    from cada.methods.revdist import flattened_cosine_loss

    torch.set_num_threads(threads)
    settings = preset("cpu", "revdist")
    settings.backbone = backbone
    detector = Detector(settings, pretrained=False)
    detector.fitted = True  # timing only: random weights run as fast as trained ones
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)

    detector.infer(images)  # warm-up: first calls pick kernels
    started = time.perf_counter()
    for _ in range(batches):
        detector.infer(images)
    inference = 16 * batches / (time.perf_counter() - started)

    method = detector.method
    started = time.perf_counter()
    with torch.no_grad():
        encoded = method.encoder(normalize(images))
    encoding = 16 / (time.perf_counter() - started)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=2e-3)
    method.train()
    steps = max(2, batches // 2)
    for step in range(steps + 1):
        if step == 1:  # the first step is warm-up
            started = time.perf_counter()
        _, decoded = method.reconstruct(encoded)
        loss = flattened_cosine_loss(encoded, decoded)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    training = 16 * steps / (time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{backbone:<20} inference {inference:6.1f} img/s   training step {training:6.1f} img/s   "
        f"encoding (once per training image) {encoding:6.1f} img/s   peak RSS {peak:5.2f} GiB",
        flush=True,
    )


def compare_anomalib(threads: int, rounds: int) -> None:
    import statistics

    import torch
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    from cada import Detector
    from cada.config import preset
    from cada.data.dataset import normalize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    settings = preset("cpu", "revdist")
    settings.backbone, settings.align = "wide_resnet50_2", "cada"
    runners = {}
    for precision in ("fp32", "bf16"):
        detector = Detector(settings, pretrained=False, device="cpu", precision=precision)
        detector.fitted = True  # timing only: random weights run as fast as trained ones
        runners[f"cada {precision}"] = lambda detector=detector: detector.infer(images)
    anomalib = ReverseDistillationModel(
        "wide_resnet50_2", (256, 256), ["layer1", "layer2", "layer3"], AnomalyMapGenerationMode.ADD, pre_trained=False
    ).eval()

    def run_anomalib():
        with torch.inference_mode():
            return anomalib(normalize(images))

    runners["anomalib fp32"] = run_anomalib
    for run in runners.values():  # warm-up: the first calls pick kernels
        run()
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    print(f"batch 16, 256x256, {threads} threads, {rounds} rounds, round-robin (images/s)")
    for round_index in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            speeds[name].append(16 / (time.perf_counter() - started))
        print(f"round {round_index + 1}: " + "   ".join(f"{name} {speeds[name][-1]:5.2f}" for name in runners))
    reference = speeds["anomalib fp32"]
    for name in runners:
        ratio = statistics.median(a / b for a, b in zip(speeds[name], reference))
        print(f"{name:<14} median {statistics.median(speeds[name]):5.2f} img/s   median ratio to anomalib {ratio:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--compare-anomalib", action="store_true", help="RevDist against anomalib's, round-robin")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)  # used by the per-backbone child process
    args = parser.parse_args()
    if args.compare_anomalib:
        compare_anomalib(args.threads, args.rounds)
        return
    if args.backbone:
        measure(args.backbone, args.threads, args.batches)
        return
    print(f"batch 16, 256x256, {args.threads} threads")
    for backbone in BACKBONES:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--backbone",
                backbone,
                "--threads",
                str(args.threads),
                "--batches",
                str(args.batches),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
