"""PyTorch against the exported graphs (ONNX and OpenVINO) on real images at their own sizes: scores, decisions,
throughput.

    python benchmarks/onnx_parity.py RUN --data ROOT [--threads 2]

Exports RUN with `--input resized` and `--input raw`, as ONNX and as OpenVINO IR, into a scratch folder. Parity:
every test image of ROOT (MVTec layout) is scored by the PyTorch detector (the image resized by cada's rule,
`cada.data.resize`), by each resized graph on that same resized image and by each raw graph on the image as
decoded, at its own size; prints the largest |score| difference to PyTorch and how many decisions differ at the
run's threshold. (With the knn aligner an image whose k-th and (k+1)-th nearest training images are at nearly
the same distance can swap them on float rounding, in PyTorch too between batch sizes, and its aligned score
moves with that neighbour.) Throughput: `cada predict` over the same images with the run and with each model (its own
images/s figure: decoding, resizing, scoring and writing the CSV and JSON), `threads` threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

KINDS = ("resized", "raw")
FORMATS = {"ONNX": ".onnx", "OpenVINO": ".xml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from cada import Detector
    from cada.cli import main as cada
    from cada.data.dataset import rgb_array
    from cada.data.mvtec import mvtec_samples
    from cada.data.resize import resize_rgb
    from cada.export import export_onnx, export_openvino
    from cada.runtime import exported_scorer

    torch.set_num_threads(args.threads)
    detector = Detector.load(args.run, device="cpu")
    threshold = detector.threshold
    samples = mvtec_samples(args.data, "test")
    with tempfile.TemporaryDirectory(prefix="cada-parity-") as scratch:
        models = {}
        for name, suffix in FORMATS.items():
            export = export_onnx if suffix == ".onnx" else export_openvino
            for kind in KINDS:
                models[f"{name} {kind}"] = export(detector, Path(scratch) / f"{kind}{suffix}", input=kind)
        # resized graphs through cada's own scorer; raw graphs fed the decoded image (`cada predict` would resize it)
        scorers = {
            label: exported_scorer(path, "cpu")[0] for label, path in models.items() if label.endswith("resized")
        }
        scores: dict[str, list[float]] = {"PyTorch": [], **{label: [] for label in models}}
        sizes = set()
        for sample in samples:
            rgb = rgb_array(sample.path)
            sizes.add(rgb.shape[:2])
            resized = resize_rgb(rgb, detector.settings.input_size, detector.settings.resize)[None]
            scores["PyTorch"].append(float(detector.predict(resized).scores[0]))
            for label, path in models.items():
                raw = label.endswith("raw")
                scores[label].append(_raw_score(path, rgb) if raw else float(scorers[label](resized)[0][0]))
        reference = np.array(scores["PyTorch"])
        pixels = sorted(h * w for h, w in sizes)
        print(
            f"{len(samples)} test images of {args.data} ({len(sizes)} different sizes, {pixels[0]}-{pixels[-1]} "
            f"pixels), threshold {threshold}"
        )
        for label in models:
            values = np.array(scores[label])
            flips = "n/a" if threshold is None else int(((values >= threshold) != (reference >= threshold)).sum())
            gap = np.abs(values - reference)
            print(
                f"{label:<17} |score - PyTorch|: median {np.median(gap):.1e}, max {gap.max():.2e}, "
                f"{int((gap > 1e-3).sum())} above 1e-3   decisions that differ at the threshold: {flips}"
            )
        folders = sorted({str(Path(sample.path).parent) for sample in samples})
        for label, model in {"PyTorch run": args.run, **models}.items():
            out = Path(scratch) / f"predict-{label.replace(' ', '-')}"
            assert cada(["predict", str(model), *folders, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
            summary = json.loads((out / "predictions.json").read_text())
            rate, count = summary["images_per_second"], summary["n_images"]
            print(f"cada predict, {label:<17} {rate:6.1f} images/s ({count} images)")


_RUNNERS: dict = {}


def _raw_score(model: Path, rgb: np.ndarray) -> float:
    """The raw graph's score of one decoded image at its own size (`cada predict` feeds it resized images)."""
    if model not in _RUNNERS:
        if model.suffix == ".onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            _RUNNERS[model] = lambda image: session.run(["score"], {"image": image})[0]
        else:
            import openvino

            compiled = openvino.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            _RUNNERS[model] = lambda image: compiled(image)[compiled.output("score")]
    return float(_RUNNERS[model](rgb)[0])


if __name__ == "__main__":
    main()
