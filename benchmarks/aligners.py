"""Every aligner on one trained base: how close each comes to knowing the product, and what one threshold does.

    python benchmarks/aligners.py --data ROOT --out OUT [--run RUN] [--preset cpu] [--method revdist]
                                  [--holdout 0.1] [--fpr 0.01]

Without --run, trains the base (--method under the preset, no aligner) on ROOT's training images less --holdout of
each product, and saves it in OUT/base; with --run, reuses a base trained that way (`cada train --align none
--holdout 0.1`; the held-out images are drawn again with the run's seed and checked against its image count).
The base's training statistics, test outputs and held-out outputs are cached once (cada.ablation.Ablation);
each aligner then only fits on the cached statistics. Per aligner it prints pooled I-AUROC (one ranking for all
products), per-product mean I-AUROC (each product its own threshold), the per-product I-AUROC weighted by each
product's anomalous images (what the pooled figure is when every product's normal scores are perfectly aligned:
the reference for the pooled figure, see cada.evaluate.per_product_decisions), the most any per-product
rescaling of the aligner's scores could reach pooled (test labels known), % of the class-aware oracle
(each product's image scores z-scored with its own training images, class names known), and per product the
median normal test score, recall and FPR at one threshold calibrated at --fpr on the held-out normals, with the
seconds each aligner took to fit and align. Writes OUT/aligners.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cada import workflows
from cada.ablation import Ablation, Variant
from cada.align.class_aware import class_score_statistics
from cada.api import Detector, split_holdout
from cada.checkpoint import write_json
from cada.commands.options import positive_int
from cada.config import preset
from cada.evaluate import image_only_metrics, image_scores, oracle_scores, per_product_decisions
from cada.lookalike import SCORE
from cada.registry import METHODS
from cada.threshold import threshold_at_fpr


def variants() -> list[Variant]:
    return [
        Variant("none", "none"),
        Variant("cada", "cada"),
        Variant("cada-sigma", "cada-sigma"),
        Variant("cada-score", "cada-score"),
        Variant("classifier", "classifier"),
        Variant("class-aware (CaDA-A)", "class-aware"),
        *(Variant(f"knn k={k}", "knn", {"neighbours": k}) for k in (5, 10, 20)),
        *(Variant(f"knn-distance w={w}", "knn-distance", {"distance_weight": w}) for w in (0.25, 0.5, 1.0)),
        Variant("distance-only", "distance-only"),  # the default method's: its map is normalised already
        *(Variant(f"knn-level k={k}", "knn-level", {"neighbours": k}) for k in (5, 20)),
    ]


def row_of(
    label: str,
    test_scores: np.ndarray,
    calibration_scores: np.ndarray | None,
    labels,
    class_names,
    fpr: float,
    seconds: float | None,
) -> dict:
    pooled, per_product_mean = image_only_metrics(test_scores, labels, class_names)
    threshold = threshold_at_fpr(calibration_scores, fpr) if calibration_scores is not None else None
    products = per_product_decisions(test_scores, labels, class_names, threshold)
    return {
        "aligner": label,
        "pooled_i_auroc": pooled["i_auroc"],
        "per_product_i_auroc": per_product_mean["i_auroc"],
        "seconds": None if seconds is None else round(seconds, 2),
        **products,
    }


def format_tables(rows: list[dict], oracle_pooled: float) -> str:
    products = list(rows[0]["products"])
    header = f"{'aligner':<22} {'pooled':>7} {'per-prod':>8} {'aligned':>8} {'ceiling':>8} {'% oracle':>8} {'time':>7}"
    lines = [
        "I-AUROC (percent): pooled = one ranking for all products; per-prod = mean of each product's own;",
        "aligned = per-product weighted by anomalies, the pooled figure if every product's normals were aligned;",
        "ceiling = the most any per-product rescaling of the scores could reach pooled, the test labels known",
        header,
        "-" * len(header),
    ]
    for row in rows:
        timing = "-" if row["seconds"] is None else f"{row['seconds']:.1f}s"
        lines.append(
            f"{row['aligner']:<22} {100 * row['pooled_i_auroc']:7.1f} {100 * row['per_product_i_auroc']:8.1f} "
            f"{100 * row['normals_aligned_i_auroc']:8.1f} {100 * row['ceiling_i_auroc']:8.1f} "
            f"{100 * row['pooled_i_auroc'] / oracle_pooled:7.1f}% "
            f"{timing:>7}"
        )
    for title, key, scale, digits in (
        ("median normal test score", "median_normal_score", 1, 3),
        ("recall % at the one calibrated threshold", "recall", 100, 1),
        ("FPR % on test normals at the one calibrated threshold", "fpr", 100, 1),
    ):
        lines += ["", title, f"{'aligner':<22} " + " ".join(f"{p[:12]:>12}" for p in products)]
        for row in rows:
            cells = []
            for product in products:
                value = row["products"][product][key]
                cells.append(f"{'-' if value is None else f'{scale * value:.{digits}f}':>12}")
            lines.append(f"{row['aligner']:<22} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    parser.add_argument("--out", type=Path, required=True, help="folder for the base (without --run) and aligners.json")
    parser.add_argument("--run", type=Path, help="reuse this base (trained with --align none --holdout HOLDOUT)")
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--method", choices=METHODS, default="revdist", help="base method to train (without --run)")
    parser.add_argument(
        "--holdout", type=float, default=0.1, help="fraction of each product's training images held out"
    )
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false-positive rate of the calibrated threshold"
    )
    parser.add_argument("--iters", type=positive_int, help="base training iterations (default: the preset's)")
    parser.add_argument("--image-size", type=int, help="input size (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.run:
        detector = Detector.load(args.run)
    else:
        settings = preset(args.preset, args.method)
        settings.align = "none"
        if args.iters is not None:
            settings.base.iters, settings.base.epochs = args.iters, None
        if args.image_size is not None:
            settings.image_size = args.image_size
        detector = workflows.train(
            settings, args.data, args.out / "base", progress=False, holdout=args.holdout, fpr=args.fpr
        )
    base_seconds = time.perf_counter() - started
    train, held_out = split_holdout(workflows.find_split(args.data, "train"), args.holdout, detector.settings.seed)
    trained_on = detector.training_info.get("n_images")
    if trained_on is not None and trained_on != len(train):
        parser.error(
            f"the run was trained on {trained_on} images, not the {len(train)} left by --holdout "
            f"{args.holdout}: give the --holdout it was trained with"
        )
    test = workflows.find_split(args.data, "test", quiet=True)
    ablation = Ablation(detector, train, test, progress=False, calibration_samples=held_out)
    labels, class_names = ablation.test.labels, ablation.test.class_names
    print(
        f"{args.data}: {len(train)} training images, {len(held_out)} held out for calibration, {len(test)} test "
        f"images, {len(set(class_names))} products; base {detector.settings.method} {detector.settings.backbone} "
        f"{detector.training_info.get('base_iters') or detector.settings.base.iters} iters, "
        f"{'loaded' if args.run else 'trained'} in {base_seconds:.0f} s; "
        f"caches {ablation.cache_seconds:.0f} s"
    )

    rows = []
    for variant in variants():
        fitted = time.perf_counter()
        aligner = ablation.fit(variant)
        test_outputs, calibration_outputs = (
            ablation.aligned(aligner, outputs) for outputs in (ablation.test, ablation.calibration)
        )
        aligned = variant.align != "none"
        everything = lambda outputs: np.arange(len(outputs.samples))  # noqa: E731
        test_scores = image_scores(test_outputs, everything(test_outputs), aligned)
        calibration_scores = image_scores(calibration_outputs, everything(calibration_outputs), aligned)
        rows.append(
            row_of(
                variant.label,
                test_scores,
                calibration_scores,
                labels,
                class_names,
                args.fpr,
                time.perf_counter() - fitted,
            )
        )
        with torch.inference_mode():
            distances = [
                aligner.nearest_distance(outputs.align_features) for outputs in (ablation.calibration, ablation.test)
            ]
        if distances[0] is not None:  # how often known products' new normal images are called unfamiliar
            reference = aligner.unfamiliar_reference
            rows[-1]["unfamiliar_held_out"] = float((distances[0] > reference).float().mean())
            rows[-1]["unfamiliar_test_normal"] = float(
                (distances[1][torch.from_numpy(labels == 0)] > reference).float().mean()
            )
    statistics = class_score_statistics(ablation.train_stats[:, SCORE], ablation.train_class_names)
    oracle = row_of(
        "oracle (class-aware z)",
        oracle_scores(ablation.test, statistics),
        oracle_scores(ablation.calibration, statistics),
        labels,
        class_names,
        args.fpr,
        None,
    )
    rows.append(oracle)
    print(format_tables(rows, oracle["pooled_i_auroc"]))
    for row in rows:
        if "unfamiliar_held_out" in row:
            print(
                f"{row['aligner']}: flagged unfamiliar: {100 * row['unfamiliar_held_out']:.1f}% of held-out normals, "
                f"{100 * row['unfamiliar_test_normal']:.1f}% of test normals (products it was trained on)"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "aligners.json",
        {
            "data": str(args.data),
            "run": str(args.run or args.out / "base"),
            "n_train": len(train),
            "n_held_out": len(held_out),
            "n_test": len(test),
            "base_seconds": round(base_seconds, 1),
            "cache_seconds": round(ablation.cache_seconds, 1),
            "rows": rows,
        },
    )
    print(f"wrote {args.out / 'aligners.json'}")


if __name__ == "__main__":
    main()
