"""Quality on real images: train RevDist + CADA on all realmix classes mixed, evaluate both protocols.

    python benchmarks/realmix.py [--data ../shared/data/realmix] [--out runs/realmix] [--preset cpu]

Prints the results table (base vs +CADA, absolute- vs model-unified), per-class figures, and the time each
stage took; writes OUT/results.json and OUT/plots/score_distributions.png. Any MVTec-layout root works with --data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cada.commands.options import positive_int
from cada.config import preset
from cada.workflows import evaluate, train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realmix"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/realmix"))
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--iters", type=positive_int, help="base training iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = preset(args.preset)
    settings.seed = args.seed
    if args.iters is not None:
        settings.base.iters, settings.base.epochs = args.iters, None
    started = time.perf_counter()
    detector = train(settings, args.data, args.out, progress=False)
    trained = time.perf_counter()
    evaluate(detector, args.data, args.out / "results.json", progress=False, plots_dir=args.out / "plots")
    print(f"train {trained - started:.0f} s, evaluate {time.perf_counter() - trained:.0f} s")


if __name__ == "__main__":
    main()
