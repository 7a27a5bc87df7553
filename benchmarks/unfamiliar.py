"""Does knn's "unfamiliar product" flag separate products never trained on from new images of trained ones?

    python benchmarks/unfamiliar.py --run RUN --data ROOT --other OTHER_ROOT [--holdout 0.1]

RUN was trained on ROOT's training images less --holdout of each product (`cada train --holdout 0.1`). Its aligner
is used if it is a knn one (the default); otherwise a knn aligner is fitted on those training images. The script
prints the reference distance (the 99th percentile of the training images' leave-one-out nearest distances) and
the flag's threshold (`unfamiliar_reference`, a margin times the reference), then for ROOT's held-out normals, its
test normals, its anomalous test images per product, and every product of OTHER_ROOT (never trained on; all their
test images): the distance to the nearest training image as a multiple of the reference (min, median, max), and
the share beyond the reference and beyond the flag's threshold. Anomalous images of trained products must stay
below the threshold: an image flagged "unfamiliar" is reported as likely a product the run was not trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cada.align import create_aligner
from cada.align.knn import KNNAligner
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
    size, resize = detector.settings.input_size, detector.settings.resize
    train, held_out = split_holdout(find_split(args.data, "train", quiet=True), args.holdout, detector.settings.seed)
    if not isinstance(detector.aligner, KNNAligner):
        features, statistics = detector.training_statistics(load_all(train, size, resize=resize)[0])
        detector.aligner = create_aligner("knn", detector.method.align_channels, detector.settings.aligner)
        detector.aligner.fit(features, statistics, detector.settings.aligner, torch.Generator().manual_seed(0))
    aligner = detector.aligner
    assert isinstance(aligner, KNNAligner)
    reference, threshold = float(aligner.reference_distance), aligner.unfamiliar_reference

    def distances(samples) -> torch.Tensor:
        images = load_all(samples, size, resize=resize)[0]
        with torch.no_grad():
            return torch.cat(
                [aligner.nearest_distance(detector.infer(batch).align_features) for batch in images.split(16)]
            )

    test = find_split(args.data, "test", quiet=True)
    sets = {
        f"{args.data.name}: held-out normals": held_out,
        f"{args.data.name}: test normals": [s for s in test if s.label == 0],
    }
    for product in sorted({s.class_name for s in test if s.label == 1}):
        sets[f"{product}: anomalous test images"] = [s for s in test if s.label == 1 and s.class_name == product]
    other = find_split(args.other, "test", quiet=True)
    for product in sorted({s.class_name for s in other}):
        sets[f"{product} (never trained on): all test images"] = [s for s in other if s.class_name == product]
    print(
        f"knn on {len(aligner.train_descriptors)} training images: reference distance {reference:.3f}, "
        f"unfamiliar beyond {threshold:.3f} ({threshold / reference:g} x the reference)"
    )
    for name, samples in sets.items():
        ratio = distances(samples) / reference
        print(
            f"{name:<50} n={len(ratio):4d}  distance / reference min {ratio.min():.2f} median {ratio.median():.2f} "
            f"max {ratio.max():.2f}  beyond the reference {100 * (ratio > 1).float().mean():5.1f}%  "
            f"flagged {100 * (ratio * reference > threshold).float().mean():5.1f}%"
        )


if __name__ == "__main__":
    main()
