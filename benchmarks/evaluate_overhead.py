"""Where `cada evaluate` spends its time: decoding, inference, metrics, figures.

    python benchmarks/evaluate_overhead.py RUN [--data ../shared/data/realmix] [--threads 2] [--cache none|auto]

On the test split of --data, each stage alone, in this order: decoding the images (`iterate_batches`, with or
without the decoded-image cache), the detector's own inference on already-decoded images (`Detector.infer`,
batch 16: the ceiling), the whole evaluation pass (`evaluate.collect`: decoding + inference + masks), the metrics
(`evaluate.results_table`: both protocols, per class, per product), and the figures (score distributions, the
HTML report). Prints seconds and images/s per stage and the evaluation's throughput as a share of the detector's
own (evaluation pass + metrics, against inference alone). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realmix"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", choices=("none", "auto"), default="none", help="decoded-image cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cada.api import Detector
    from cada.data.dataset import iterate_batches, load_all
    from cada.evaluate import collect, detector_results
    from cada.report.html import write_report
    from cada.report.plots import score_distributions
    from cada.workflows import find_split

    detector = Detector.load(args.run, device="cpu")
    samples = find_split(args.data, "test", quiet=True)
    size, n = detector.settings.image_size, len(samples)
    cache = None if args.cache == "none" else "auto"
    times = {}

    started = time.perf_counter()
    for _ in iterate_batches(samples, size, 16, cache_dir=cache):
        pass
    times["decode"] = time.perf_counter() - started

    images = load_all(samples, size, cache_dir=cache)[0]
    detector.infer(images[:16])  # warm-up
    started = time.perf_counter()
    for start in range(0, n, 16):
        detector.infer(images[start : start + 16])
    times["inference alone"] = time.perf_counter() - started

    started = time.perf_counter()
    outputs = collect(detector, samples, progress=False, cache_dir=cache)
    times["evaluation pass"] = time.perf_counter() - started

    started = time.perf_counter()
    results = detector_results(detector, outputs)
    times["metrics"] = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        figure = score_distributions(outputs, Path(scratch) / "score_distributions.png", detector.settings.align)
        times["figure"] = time.perf_counter() - started
        started = time.perf_counter()
        write_report(Path(scratch) / "report", results, outputs, detector, [("Image scores per class", figure)])
        times["HTML report"] = time.perf_counter() - started

    print(f"{n} test images of {args.data}, {args.threads} threads, image cache: {args.cache}")
    for stage, seconds in times.items():
        rate = f"{n / seconds:8.1f} img/s" if stage in ("decode", "inference alone", "evaluation pass") else ""
        print(f"  {stage:<16} {seconds:8.1f} s {rate}")
    share = times["inference alone"] / (times["evaluation pass"] + times["metrics"])
    print(f"evaluation (pass + metrics) runs at {100 * share:.0f}% of the detector's own inference throughput")


if __name__ == "__main__":
    main()
