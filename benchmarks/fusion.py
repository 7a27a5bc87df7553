"""Two runs on the same products, their aligned image scores averaged: does a second base add what the first lacks?

    python benchmarks/fusion.py --first RUN_A --second RUN_B --data ROOT [--holdout 0.1] [--fpr 0.01]

RUN_A and RUN_B were trained on ROOT with the same --holdout and seed (e.g. `cada train --data ROOT --out A
--holdout 0.1` and `cada train --data ROOT --out B --method patchcore --holdout 0.1`). Each scores ROOT's test
images and the held-out normals with its own aligner; for each weight w of the second run the fused score is
(1 - w) x the first's aligned score + w x the second's (both on the aligned scale, where the typical normal
image scores 1 and one normal standard deviation is 1/3). Per weight it prints pooled I-AUROC, the mean and the
per-product I-AUROC, and at the threshold calibrated at --fpr on the fused held-out scores the recall and the
test false-positive rate, pooled and per product. Nothing here is a cada method yet: it measures whether one is
worth building (a fused run would also need fused maps, export and serving).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cada.api import Detector, split_holdout
from cada.data.dataset import load_all
from cada.evaluate import image_only_metrics, per_product_decisions
from cada.threshold import threshold_at_fpr
from cada.workflows import find_split

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
DECISIONS = ("i_auroc", "recall", "fpr")  # per product, as per_product_decisions gives them


def aligned_scores(detector: Detector, samples) -> np.ndarray:
    images = load_all(samples, detector.settings.input_size, resize=detector.settings.resize)[0]
    with torch.no_grad():
        return torch.cat([detector.infer(batch).aligned_scores for batch in images.split(16)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=Path, required=True)
    parser.add_argument("--second", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = [Detector.load(args.first), Detector.load(args.second)]
    seeds = {run.settings.seed for run in runs}
    if len(seeds) != 1:
        raise SystemExit(f"the runs were trained with different seeds {sorted(seeds)}: their held-out images differ")
    _, held_out = split_holdout(find_split(args.data, "train", quiet=True), args.holdout, seeds.pop())
    test = find_split(args.data, "test", quiet=True)
    labels = np.array([s.label for s in test])
    names = np.array([s.class_name for s in test])
    test_scores = [aligned_scores(run, test) for run in runs]
    held_scores = [aligned_scores(run, held_out) for run in runs]
    products = sorted(set(names))
    print(f"{args.first} + w x {args.second} on {args.data}: {len(test)} test images, {len(held_out)} held out")
    print(f"per product: {', '.join(products)}")
    for weight in WEIGHTS:
        fused = (1 - weight) * test_scores[0] + weight * test_scores[1]
        fused_held = (1 - weight) * held_scores[0] + weight * held_scores[1]
        threshold = threshold_at_fpr(fused_held, args.fpr)
        pooled, mean = image_only_metrics(fused, labels, names)
        decisions = per_product_decisions(fused, labels, names, threshold)["products"]
        each = {key: " ".join(f"{100 * decisions[p][key]:5.1f}" for p in products) for key in DECISIONS}
        normal, anomalous = fused[labels == 0], fused[labels == 1]
        print(
            f"w={weight:<4} pooled {100 * pooled['i_auroc']:5.1f}  mean {100 * mean['i_auroc']:5.1f}  "
            f"per product {each['i_auroc']} | recall {100 * (anomalous >= threshold).mean():5.1f} ({each['recall']})"
            f"  FPR {100 * (normal >= threshold).mean():4.1f} ({each['fpr']})"
        )


if __name__ == "__main__":
    main()
