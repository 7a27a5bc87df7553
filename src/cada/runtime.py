"""Running exported models: a `.onnx` graph with onnxruntime or an OpenVINO `.xml` with OpenVINO, from the JSON
that `cada export` writes beside it (threshold, preprocessing, outputs). `cada predict` and `cada serve` score
with `exported_scorer` as they do with a run folder; nothing here needs PyTorch's model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cada.threshold import check_threshold

PER_IMAGE_COLUMNS = ("u", "spread", "score_offset", "nearest_distance")  # outputs that predictions report as columns


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON beside an exported model."""
    return Path(model_path).with_suffix(".json")


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


def exported_scorer(model_path: str | Path, device: str = "cpu"):
    """(scorer, image_size, threshold, description) for cada.predict of an exported model: a .onnx file run with
    onnxruntime on `device` (see onnx_providers), or an OpenVINO .xml run on the CPU."""
    model_path = Path(model_path)
    sidecar_file = sidecar_path(model_path)
    if not sidecar_file.is_file():
        raise FileNotFoundError(f"{sidecar_file} is missing: it holds the threshold and preprocessing of {model_path}")
    try:
        sidecar = json.loads(sidecar_file.read_text())
        image_size, threshold = sidecar["preprocessing"]["image_size"], sidecar["threshold"]
        raw = sidecar.get("input_kind", "resized") == "raw"
        names = sidecar.get("outputs", ["score", "aligned_map"])  # models exported before u and spread: two
        reference = sidecar.get("unfamiliar_reference_distance")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{sidecar_file} is not the JSON file `cada export` writes beside {model_path} "
            f"({type(error).__name__}: {error})"
        ) from None
    if model_path.suffix == ".xml":
        run, description = _openvino_runner(model_path, device, names)
    else:
        run, description = _onnx_runner(model_path, device)

    def score(images: torch.Tensor) -> tuple:
        if raw:  # one image H x W x 3 per call; already resized by the same rule, so the graph's resize keeps it
            parts = [run(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in images]
            outputs = [np.concatenate(values) for values in zip(*parts)]
        else:
            outputs = run(np.ascontiguousarray(images.numpy()))
        values = {name: torch.from_numpy(np.asarray(array)) for name, array in zip(names, outputs)}
        columns = {name: values[name] for name in PER_IMAGE_COLUMNS if name in values}
        if "nearest_distance" in values and reference is not None:
            columns["unfamiliar"] = values["nearest_distance"] > reference
        return values["score"], values["aligned_map"], columns

    if threshold is not None:
        try:
            check_threshold(threshold)
        except ValueError as error:
            raise ValueError(f"{sidecar_file}: {error}") from None
    if reference is not None:
        description["unfamiliar_reference_distance"] = reference
    description["precision"] = sidecar.get("precision", "float32")
    return score, image_size, threshold, {"model": str(model_path), **description}


def _onnx_runner(path: Path, device: str):
    """(input array -> output arrays in the graph's order, description) with onnxruntime."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf

    try:
        providers = onnx_providers(device, onnxruntime.get_available_providers())
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf) as error:
        raise ValueError(
            f"{path} is not a model onnxruntime can load (damaged, or not an ONNX file?): "
            f"{str(error).strip().splitlines()[0]}"
        ) from None
    return (lambda array: session.run(None, {"image": array})), {"providers": session.get_providers()}


def _openvino_runner(path: Path, device: str, names: list[str]):
    """(input array -> output arrays in `names` order, description) with OpenVINO on the CPU, in float32 (its
    default on CPUs with bf16 instructions would be bf16)."""
    if (device or "auto").strip().lower() not in ("auto", "cpu"):
        raise ValueError(f"--device {device}: an OpenVINO model runs on the CPU here (--device cpu or auto)")
    try:
        import openvino
    except ImportError:
        raise ValueError(f"{path} is an OpenVINO model: pip install openvino") from None
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        ports = [compiled.output(name) for name in names]
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a model OpenVINO can load (damaged, its .bin missing, or not one of cada's?): "
            f"{str(error).strip().splitlines()[0]}"
        ) from None

    def run(array: np.ndarray) -> list[np.ndarray]:
        result = compiled(array)
        return [result[port] for port in ports]

    return run, {"runtime": f"OpenVINO {openvino.__version__} (CPU, f32)"}
