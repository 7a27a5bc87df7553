"""ONNX export: one graph from image to aligned map and image score, with alignment, smoothing and the
image-score reduction inside; the threshold and the preprocessing go in a JSON file beside it.

The graph takes uint8 images (B x 3 x S x S, RGB, already resized to S) so that a deployment only has to
decode and resize; ImageNet normalisation happens inside.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cada.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from cada.files import atomic_write
from cada.inference import infer_maps
from cada.scoring import align, image_score
from cada.threshold import check_threshold

OPSET = 17


class ExportedDetector(nn.Module):
    """The detector's inference path as one module: uint8 images -> (aligned scores B, aligned maps B x S x S)."""

    def __init__(self, detector):
        super().__init__()
        self.method, self.aligner = detector.method, detector.aligner
        self.sigma, self.top_fraction = detector.settings.smoothing_sigma, detector.settings.top_fraction

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, u, spread, _ = infer_maps(self.method, self.aligner, images, self.sigma)
        aligned_maps = align(maps, u, spread)
        return image_score(aligned_maps, self.top_fraction), aligned_maps


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def export_onnx(detector, out: str | Path, batch_size: int = 1) -> Path:
    """Write OUT (.onnx) and OUT.json; the batch dimension is dynamic."""
    if detector.aligner.needs_class_names:
        raise ValueError(f"the {detector.aligner.name} aligner needs class names at test time and cannot be exported")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportedDetector(detector).eval()
    size = detector.settings.image_size
    example = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():  # the tracer notes Python numbers fixed at export time: sizes, as intended
        warnings.simplefilter("ignore")
        atomic_write(
            out,
            lambda temporary: torch.onnx.export(
                module,
                (example,),
                str(temporary),
                input_names=["image"],
                output_names=["score", "aligned_map"],
                dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}, "aligned_map": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            ),
        )
    sidecar = {
        "format": "cada-onnx",
        "input": "image",
        "outputs": ["score", "aligned_map"],
        "preprocessing": {
            "image_size": size,
            "resize": "bilinear",
            "channels": "RGB",
            "dtype": "uint8",
            "normalisation_inside_graph": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        },
        "threshold": detector.threshold,
        "calibration": detector.calibration,
        "decision": "anomalous when score >= threshold",
        "settings": detector.settings.to_dict(),
    }
    atomic_write(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")
    return out


def onnx_providers(device: str, available: list[str]) -> list:
    """onnxruntime's execution providers for `device`: auto takes CUDA when the installed onnxruntime has it,
    cuda/cuda:N demands it (ValueError saying how to get it), cpu never uses it."""
    spec = (device or "auto").strip().lower()
    if spec == "cpu":
        return ["CPUExecutionProvider"]
    if spec != "auto" and not spec.startswith("cuda"):
        raise ValueError(f"--device {device}: an ONNX model runs on cpu, cuda or cuda:N (onnxruntime)")
    if "CUDAExecutionProvider" not in available:
        if spec == "auto":
            return ["CPUExecutionProvider"]
        raise ValueError(
            f"--device {device}: the installed onnxruntime has no CUDA provider (it has {', '.join(available)}); "
            "pip install onnxruntime-gpu, or predict with --device cpu"
        )
    index = int(spec.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def onnx_scorer(onnx_path: str | Path, device: str = "cpu"):
    """(scorer, image_size, threshold, description) for cada.predict, running the graph with onnxruntime on
    `device` (see onnx_providers)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf

    onnx_path = Path(onnx_path)
    sidecar_file = sidecar_path(onnx_path)
    if not sidecar_file.is_file():
        raise FileNotFoundError(f"{sidecar_file} is missing: it holds the threshold and preprocessing of {onnx_path}")
    try:
        sidecar = json.loads(sidecar_file.read_text())
        image_size, threshold = sidecar["preprocessing"]["image_size"], sidecar["threshold"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{sidecar_file} is not the JSON file `cada export` writes beside {onnx_path} "
            f"({type(error).__name__}: {error})"
        ) from None
    try:
        providers = onnx_providers(device, onnxruntime.get_available_providers())
        session = onnxruntime.InferenceSession(str(onnx_path), providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf) as error:
        raise ValueError(
            f"{onnx_path} is not a model onnxruntime can load (damaged, or not an ONNX file?): "
            f"{str(error).strip().splitlines()[0]}"
        ) from None

    def score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = session.run(None, {"image": np.ascontiguousarray(images.numpy())})
        return torch.from_numpy(scores), torch.from_numpy(maps)

    if threshold is not None:
        try:
            check_threshold(threshold)
        except ValueError as error:
            raise ValueError(f"{sidecar_file}: {error}") from None
    return score, image_size, threshold, {"model": str(onnx_path), "providers": session.get_providers()}
