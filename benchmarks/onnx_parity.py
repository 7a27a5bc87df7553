"""PyTorch against the exported ONNX graphs on real images at their own sizes: scores, decisions, throughput.

    python benchmarks/onnx_parity.py RUN --data ROOT [--threads 2]

Exports RUN with `--input resized` and `--input raw` into a scratch folder. Parity: every test image of ROOT
(MVTec layout) is scored by the PyTorch detector (the image resized by cada's rule, `cada.data.resize`), by the
resized graph on that same resized image and by the raw graph on the image as decoded, at its own size; prints
the largest |score| difference to PyTorch and how many decisions differ at the run's threshold. Throughput:
`cada predict` over the same images with the run and with each graph, `threads` threads (its own images/s
figure: decoding, resizing, scoring and writing the CSV and JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

KINDS = ("resized", "raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime

    from cada import Detector
    from cada.cli import main as cada
    from cada.data.dataset import rgb_array
    from cada.data.mvtec import mvtec_samples
    from cada.data.resize import resize_rgb
    from cada.export import export_onnx

    torch.set_num_threads(args.threads)
    detector = Detector.load(args.run, device="cpu")
    threshold = detector.threshold
    samples = mvtec_samples(args.data, "test")
    with tempfile.TemporaryDirectory(prefix="cada-parity-") as scratch:
        models = {kind: export_onnx(detector, Path(scratch) / f"{kind}.onnx", input=kind) for kind in KINDS}
        targets = {"PyTorch run": args.run, "ONNX resized": models["resized"], "ONNX raw": models["raw"]}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {
            kind: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for kind, path in models.items()
        }
        scores: dict[str, list[float]] = {"pytorch": [], "resized": [], "raw": []}
        sizes = set()
        for sample in samples:
            rgb = rgb_array(sample.path)
            sizes.add(rgb.shape[:2])
            resized = resize_rgb(rgb, detector.settings.image_size)
            scores["pytorch"].append(float(detector.predict(resized[None]).scores[0]))
            scores["resized"].append(float(sessions["resized"].run(None, {"image": resized[None].numpy()})[0][0]))
            scores["raw"].append(float(sessions["raw"].run(None, {"image": rgb})[0][0]))
        reference = np.array(scores["pytorch"])
        print(
            f"{len(samples)} test images of {args.data} ({len(sizes)} different sizes, "
            f"{min(h * w for h, w in sizes)}-{max(h * w for h, w in sizes)} pixels), threshold {threshold}"
        )
        for kind in ("resized", "raw"):
            values = np.array(scores[kind])
            flips = "n/a" if threshold is None else int(((values >= threshold) != (reference >= threshold)).sum())
            print(
                f"ONNX {kind:<8} max |score - PyTorch| {np.abs(values - reference).max():.2e}   "
                f"decisions that differ at the threshold: {flips}"
            )
        folders = sorted({str(Path(sample.path).parent) for sample in samples})
        for name, model in targets.items():
            out = Path(scratch) / f"predict-{name.replace(' ', '-')}"
            assert cada(["predict", str(model), *folders, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
            summary = json.loads((out / "predictions.json").read_text())
            rate, count = summary["images_per_second"], summary["n_images"]
            print(f"cada predict, {name:<12} {rate:6.1f} images/s ({count} images)")


if __name__ == "__main__":
    main()
