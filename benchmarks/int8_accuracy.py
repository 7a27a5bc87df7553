"""What int8 costs in accuracy: a run exported to OpenVINO in float32 and in int8 (`cada export --int8`: NNCF,
calibrated on the run's training images), both scoring the test images of a data root.

    python benchmarks/int8_accuracy.py RUN --data ROOT [--calibration-images 300] [--threads 2]

Prints, for each model, the pooled I-AUROC (one threshold for every product) and each product's; how far the int8
aligned scores move from the float32 ones (median and largest); and the decisions at the run's calibrated threshold
(RUN/config.json) that int8 changes, per product and in all, split into defects missed and normals newly flagged.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cada import Detector
from cada.data.dataset import load_all
from cada.export import export_openvino
from cada.metrics import auroc
from cada.runtime import exported_scorer
from cada.workflows.common import find_split
from cada.workflows.export import CALIBRATION_IMAGES, calibration_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="data root whose test images are scored")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    detector = Detector.load(args.run, device="cpu")
    samples = find_split(args.data, "test", quiet=True)
    images = load_all(samples, detector.settings.input_size, resize=detector.settings.resize)[0]
    labels = np.array([sample.label for sample in samples])
    products = np.array([sample.class_name for sample in samples])
    scores = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("float32", "int8"):
            started = time.perf_counter()
            calibration = calibration_images(detector, count=args.calibration_images) if name == "int8" else None
            model = export_openvino(detector, Path(scratch) / f"{name}.xml", calibration_images=calibration)
            exported = time.perf_counter() - started
            score = exported_scorer(model)[0]
            scores[name] = torch.cat([score(images[i : i + 16])[0] for i in range(0, len(images), 16)]).numpy()
            per_product = "  ".join(
                f"{p} {100 * auroc(scores[name][products == p], labels[products == p]):5.1f}"
                for p in sorted(set(products))
            )
            print(
                f"{name:<8} I-AUROC pooled {100 * auroc(scores[name], labels):5.1f}   {per_product}   "
                f"(export {exported:.0f} s)"
            )
    change = np.abs(scores["int8"] - scores["float32"])
    print(f"int8 aligned scores move by median {np.median(change):.3f}, at most {change.max():.3f}")
    threshold = detector.threshold
    if threshold is None:
        print("the run has no calibrated threshold: no decisions to compare")
        return
    flagged = {name: values >= threshold for name, values in scores.items()}
    changed = flagged["int8"] != flagged["float32"]
    print(f"decisions at the run's threshold {threshold:.4f} that int8 changes: {changed.sum()} of {len(changed)}")
    for product in sorted(set(products)):
        mine = products == product
        missed = (changed & mine & (labels == 1) & flagged["float32"]).sum()
        caught = (changed & mine & (labels == 1) & flagged["int8"]).sum()
        flagged_normal = (changed & mine & (labels == 0) & flagged["int8"]).sum()
        cleared_normal = (changed & mine & (labels == 0) & flagged["float32"]).sum()
        print(
            f"  {product:<16} {(changed & mine).sum():3d} of {mine.sum():3d}: defects newly missed {missed}, newly "
            f"caught {caught}; normals newly flagged {flagged_normal}, newly cleared {cleared_normal}"
        )


if __name__ == "__main__":
    main()
