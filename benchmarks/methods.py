"""Base methods with and without CADA (RevDist, ReContrast, UniAD, PatchCore, DRAEM, CFA), both protocols, one table.

    python benchmarks/methods.py [--data ../shared/data/realmix] [--out runs/methods] [--preset cpu]
                                 [--methods revdist recontrast ...] [--backbone NAME] [--align cada]
                                 [--iters N] [--align-iters N]

Each method is trained once with the preset's settings for that method (`cada train --method M --preset P`)
and an aligner on top (--align, default: the preset's); the base map ("none") and the aligned map are evaluated
under the absolute-unified and the model-unified protocol. Prints each run's own report, then one table of all
rows, the base's I-AUROC per product, and the time each stage took, wall and CPU (user + system seconds of this
process: the cost of a run even when other jobs share the cores); writes OUT/methods.json (and each run in
OUT/METHOD). Any MVTec-layout root works with --data. `--iters` sets the same number of base iterations for
every method; `--backbone` the same encoder.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from cada.checkpoint import write_json
from cada.commands.options import positive_int
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
    parser.add_argument("--backbone", help="encoder for every method (default: each preset's)")
    parser.add_argument("--align", help="aligner (default: the preset's)")
    parser.add_argument(
        "--iters", type=positive_int, help="base training iterations for every method (default: the preset's)"
    )
    parser.add_argument("--align-iters", type=positive_int, help="CADA regressor iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows, runs = [], {}
    for method in args.methods:
        settings = preset(args.preset, method)
        settings.seed = args.seed
        if args.align is not None:
            settings.align = args.align
        if args.backbone is not None:
            settings.backbone = args.backbone
        if args.iters is not None:
            settings.base.iters, settings.base.epochs = args.iters, None
        if args.align_iters is not None:
            settings.aligner.iters = args.align_iters
        print(f"\n=== {method} ===")
        started, cpu_started = time.perf_counter(), cpu_seconds()
        detector = train(settings.validate(), args.data, args.out / method, progress=False)
        results = evaluate(detector, args.data, args.out / method / "results.json", progress=False)
        info = detector.training_info
        runs[method] = {
            "settings": settings.to_dict(),
            "n_train_images": info["n_images"],
            "base_iters": info["base_iters"],
            "base_seconds": info["base_seconds"],
            # PatchCore has no iterations: its base time is one pass building the memory bank.
            "base_seconds_per_iter": None
            if method == "patchcore"
            else round(info["base_seconds"] / info["base_iters"], 3),
            "aligner_seconds": info["aligner_seconds"],
            "evaluate_seconds": results["meta"]["evaluate_seconds"],
            "total_seconds": round(time.perf_counter() - started, 1),
            "total_cpu_seconds": round(cpu_seconds() - cpu_started, 1),
            "base_i_auroc": {product: row["i_auroc"] for product, row in results["per_class"]["none"].items()},
        }
        rows += results["rows"]

    print(f"\n=== all methods ({args.preset} preset, {args.data}) ===")
    print(format_table({"rows": rows}))
    products = sorted({product for run in runs.values() for product in run["base_i_auroc"]})
    print("\nbase I-AUROC per product (each product its own threshold)")
    print(f"{'method':<12} " + " ".join(f"{p[:12]:>12}" for p in products) + f" {'mean':>6}")
    for method, run in runs.items():
        scores = [run["base_i_auroc"].get(p) for p in products]
        known = [s for s in scores if s is not None]
        print(
            f"{method:<12} "
            + " ".join("           -" if s is None else f"{100 * s:12.1f}" for s in scores)
            + f" {100 * sum(known) / len(known):6.1f}"
        )
    print(
        "\ntime (s)        base  per iter  aligner  evaluate   total  total CPU  (iters, image size, batch, "
        "encoder); base includes encoding the training images once"
    )
    for method, run in runs.items():
        base = run["settings"]["base"]
        per_iter = "-" if run["base_seconds_per_iter"] is None else f"{run['base_seconds_per_iter']:.2f}"
        print(
            f"{method:<12} {run['base_seconds']:7.0f} {per_iter:>9} "
            f"{run['aligner_seconds']:8.0f} {run['evaluate_seconds']:9.0f} {run['total_seconds']:7.0f} "
            f"{run['total_cpu_seconds']:10.0f}  ({run['base_iters']}, {run['settings']['image_size']} px, "
            f"{base['batch_size']}, {run['settings']['backbone']})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "methods.json", {"data": str(args.data), "preset": args.preset, "rows": rows, "runs": runs})
    print(f"wrote {args.out / 'methods.json'}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
