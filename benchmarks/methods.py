"""Base methods with and without CADA (RevDist, ReContrast, UniAD, PatchCore, DRAEM, CFA), both protocols, one table.

    python benchmarks/methods.py [--data ../shared/data/realmix] [--out runs/methods] [--preset cpu]
                                 [--methods revdist recontrast ...] [--iters N] [--align-iters N]

Each method is trained once with the preset's settings for that method (`cada train --method M --preset P`)
and the CADA regressor on top; the base map ("none") and the CADA-aligned map are evaluated under the
absolute-unified and the model-unified protocol. Prints each run's own report, then one table of all rows
and the time each stage took; writes OUT/methods.json (and each run in OUT/METHOD). Any MVTec-layout root
works with --data. `--iters` sets the same number of base iterations for every method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cada.checkpoint import write_json
from cada.cli import positive_int
from cada.config import preset
from cada.evaluate import format_table
from cada.registry import METHODS
from cada.workflows import evaluate, train

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realmix"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iters", type=positive_int, help="base training iterations for every method (default: the preset's)")
    parser.add_argument("--align-iters", type=positive_int, help="CADA regressor iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows, runs = [], {}
    for method in args.methods:
        settings = preset(args.preset, method)
        settings.align, settings.seed = "cada", args.seed
        if args.iters is not None:
            settings.base.iters, settings.base.epochs = args.iters, None
        if args.align_iters is not None:
            settings.aligner.iters = args.align_iters
        print(f"\n=== {method} ===")
        started = time.perf_counter()
        detector = train(settings.validate(), args.data, args.out / method, progress=False)
        results = evaluate(detector, args.data, args.out / method / "results.json", progress=False)
        info = detector.training_info
        runs[method] = {
            "settings": settings.to_dict(),
            "n_train_images": info["n_images"],
            "base_iters": info["base_iters"],
            "base_seconds": info["base_seconds"],
            # PatchCore has no iterations: its base time is one pass building the memory bank.
            "base_seconds_per_iter": None if method == "patchcore" else round(info["base_seconds"] / info["base_iters"], 3),
            "aligner_seconds": info["aligner_seconds"],
            "evaluate_seconds": results["meta"]["evaluate_seconds"],
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        rows += results["rows"]

    print(f"\n=== all methods ({args.preset} preset, {args.data}) ===")
    print(format_table({"rows": rows}))
    print("\ntime (s)        base  per iter  aligner  evaluate   total   (iters, image size, batch); "
          "base includes encoding the training images once")
    for method, run in runs.items():
        base = run["settings"]["base"]
        per_iter = "-" if run["base_seconds_per_iter"] is None else f"{run['base_seconds_per_iter']:.2f}"
        print(f"{method:<12} {run['base_seconds']:7.0f} {per_iter:>9} "
              f"{run['aligner_seconds']:8.0f} {run['evaluate_seconds']:9.0f} {run['total_seconds']:7.0f}   "
              f"({run['base_iters']}, {run['settings']['image_size']} px, {base['batch_size']})")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "methods.json", {"data": str(args.data), "preset": args.preset, "rows": rows, "runs": runs})
    print(f"wrote {args.out / 'methods.json'}")


if __name__ == "__main__":
    main()
