"""Does knn's "unfamiliar product" flag separate products never trained on from new images of trained ones?

    python benchmarks/unfamiliar.py --run RUN --data ROOT --other OTHER_ROOT [--holdout 0.1]

RUN is a base trained on ROOT's training images less --holdout of each product (e.g. `cada train --align none
--holdout 0.1`, or the base that benchmarks/aligners.py writes). The knn aligner is fitted on those training
images; the script prints the reference distance and, for ROOT's held-out and test normal images and for every
product of OTHER_ROOT (whose products the run never saw; all their test images), the median distance to the
nearest training image and the share flagged as unfamiliar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cada.align import create_aligner
from cada.api import Detector, split_holdout
from cada.data.dataset import load_all
from cada.workflows import find_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the products the run was trained on")
    parser.add_argument("--other", type=Path, required=True, help="products the run was never trained on")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    detector = Detector.load(args.run)
    size = detector.settings.input_size
    train, held_out = split_holdout(find_split(args.data, "train", quiet=True), args.holdout, detector.settings.seed)
    resize = detector.settings.resize
    features, statistics = detector.training_statistics(load_all(train, size, resize=resize)[0])
    detector.aligner = create_aligner("knn", detector.method.align_channels, detector.settings.aligner)
    detector.aligner.fit(features, statistics, detector.settings.aligner, torch.Generator().manual_seed(0))
    reference = float(detector.aligner.reference_distance)

    def distances(samples) -> torch.Tensor:
        images = load_all(samples, size, resize=resize)[0]
        return torch.cat(
            [detector.aligner.nearest_distance(detector.infer(batch).align_features) for batch in images.split(16)]
        )

    sets = {
        f"{args.data.name}: held-out normals": held_out,
        f"{args.data.name}: test normals": [s for s in find_split(args.data, "test", quiet=True) if s.label == 0],
    }
    other = find_split(args.other, "test", quiet=True)
    for product in sorted({s.class_name for s in other}):
        sets[f"{product} (never trained on): all test images"] = [s for s in other if s.class_name == product]
    print(f"knn on {len(train)} training images; unfamiliar beyond distance {reference:.3f}")
    for name, samples in sets.items():
        found = distances(samples)
        print(
            f"{name:<50} n={len(found):4d}  median distance {found.median():.3f}  "
            f"flagged {100 * (found > reference).float().mean():5.1f}%"
        )


if __name__ == "__main__":
    main()
