"""ONNX and OpenVINO export: one graph from image to aligned map and image score, with alignment, smoothing and the
image-score reduction inside; the threshold and the preprocessing go in a JSON file beside it.

Two inputs (`--input`):
- resized (default): uint8 images B x 3 x S x S (RGB, NCHW), already resized to S by `cada.data.resize`'s rule;
  batches of any size. The deployment decodes and resizes.
- raw: one uint8 RGB image H x W x 3 of any size; the graph resizes it by the same rule (`resize_uint8`, equal to
  training's resize to the last bit), so the deployment only decodes. One image per call.
ImageNet normalisation happens inside both. `cada.runtime` runs what this writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cada.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from cada.data.resize import PAD_RGB, resize_uint8
from cada.files import atomic_write
from cada.inference import image_distances, infer
from cada.runtime import sidecar_path
from cada.tiles import stride_of

OPSET = 17  # the traced model (torch's tracer exports it wrongly at 18: measured, maps off by ~10)
RAW_OPSET = 18  # torch.export's ONNX translation of the raw graph's resize needs 18; the model is converted to it
INPUTS = ("resized", "raw")
RESIZE_RULE = (
    "Pillow's bilinear filter (antialiased when shrinking), horizontal pass then vertical, each rounded to 8 bits "
    "(cada.data.resize)"
)
SQUASH_RULE = "squash: each axis resized to image_size"
LETTERBOX_RULE = (
    f"letterbox: the long side resized to image_size, the short one to round(short x image_size / long) (half up, at "
    f"least 1), centred (offsets rounded down) on an image_size square of RGB {PAD_RGB}"
)
MAX_SIDE = 2**15  # the raw graph's largest accepted image side


def output_names(detector) -> list[str]:
    """The graph's outputs: aligned score B, aligned map B x S x S, the image's predicted normal statistics u and
    spread (B each, as `cada predict` reports them), for an aligner that scores the image as a whole (knn-distance)
    its score offset B, and for one with an unfamiliar-product signal (knn, knn-distance) the distance to the nearest
    training image B."""
    names = ["score", "aligned_map", "u", "spread"]
    if detector.aligner.has_score_offset:
        names.append("score_offset")
    if detector.aligner.unfamiliar_reference is not None:
        names.append("nearest_distance")
    return names


class ExportedDetector(nn.Module):
    """The detector's inference path as one module: uint8 images -> the `output_names` tensors."""

    def __init__(self, detector):
        super().__init__()
        self.method, self.aligner, self.settings = detector.method, detector.aligner, detector.settings

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = infer(self.method, self.aligner, images, self.settings)
        outputs = [result.aligned_scores, result.aligned_maps, result.u, result.spread]
        if result.offset is not None:
            outputs.append(result.offset)
        distance = image_distances(self.aligner, result.align_features, self.settings)
        if distance is not None:
            outputs.append(distance)
        return tuple(outputs)


class RawImageFront(nn.Module):
    """One RGB image H x W x 3 uint8 -> the model's input 1 x 3 x S x S, resized by cada's rule (squashed or
    letterboxed, as the run was trained)."""

    def __init__(self, size: int, mode: str):
        super().__init__()
        self.size, self.mode = size, mode

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return resize_uint8(image.permute(2, 0, 1), self.size, self.mode).unsqueeze(0)


def export_onnx(detector, out: str | Path, batch_size: int = 1, input: str = "resized") -> Path:
    """Write OUT (.onnx) and OUT.json; `input` "resized" (batch dimension dynamic) or "raw" (see the module
    docstring)."""
    out = _check_export(detector, out, input, ".onnx")
    if input == "raw":
        atomic_write(out, lambda temporary: _export_raw(detector, temporary))
    else:
        atomic_write(out, lambda temporary: _export_model(detector, temporary, "image", batch_size))
    _write_sidecar(detector, out, input)
    return out


def export_openvino(
    detector, out: str | Path, input: str = "resized", calibration_images: torch.Tensor | None = None
) -> Path:
    """Write OUT (.xml, with its weights in OUT.bin) and OUT.json: the ONNX graph converted by OpenVINO's
    converter (`openvino` package). With `calibration_images` (normal images, a few hundred, in any form
    `Detector.predict` takes) the networks are quantised to int8 (`quantise_int8`). The .bin is put in place
    before the .xml that names it."""
    import tempfile

    import openvino

    out = _check_export(detector, out, input, ".xml")
    if calibration_images is not None:
        calibration_images = _calibration(detector, calibration_images)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        onnx_file = export_onnx(detector, Path(scratch) / "model.onnx", input=input)
        model = openvino.convert_model(str(onnx_file))
        if calibration_images is not None:
            model = quantise_int8(detector, model, calibration_images, input)
        staged = Path(scratch) / out.name
        # float32 weights: save_model's default halves them to float16 (measured: aligned scores off by up to 1.4)
        openvino.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(staged, out)
    precision = (
        f"int8: the {' and '.join(detector.method.int8_modules)} (but their first and depthwise convolutions) "
        f"quantised by NNCF on {len(calibration_images)} normal images; the rest in float32"
        if calibration_images is not None
        else "float32"
    )
    _write_sidecar(detector, out, input, precision)
    return out


def import_nncf():
    """The nncf module, or ValueError saying what to install."""
    # importing nncf imports torch's C++-extension helper, which warns on CUDA builds without a GPU
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise ValueError("--int8 needs the nncf package: pip install nncf") from None
    return nncf


def quantise_int8(detector, model, images: torch.Tensor, input: str = "resized"):
    """The OpenVINO `model` with NNCF's post-training int8 quantisation (weights symmetric, activations
    asymmetric; for CPUs) of the method's `int8_modules` but their first and depthwise convolutions, activation
    ranges from `images` (as `Detector.predict` takes them). Everything else (a bottleneck, the PatchCore search, the
    normalisers, the aligner, the smoothing and the score) stays float32 (`_operations_inside` tells them
    apart)."""
    nncf = import_nncf()
    images = _calibration(detector, images)
    networks = re.compile(rf"/method/({'|'.join(re.escape(name) for name in detector.method.int8_modules)})/")
    inside = _operations_inside(model, networks)
    # The convolution that reads the image and the depthwise ones (EfficientNet's) stay float32 too: int8 there
    # moved the scores twice as far and changed more decisions, for a few percent of the work
    # (docs/results/export-and-speed.md).
    convolutions = (op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
    first = [name for name in convolutions if inside[name]][:1]  # none in a ViT's blocks
    outside = [name for name, quantise in inside.items() if not quantise]
    keep_float = nncf.IgnoredScope(names=[*first, *outside], types=["GroupConvolution"], validate=False)
    if input == "raw":  # one H x W x 3 image a call, already at the input size: the graph's resize keeps it
        items = [np.ascontiguousarray(image.permute(1, 2, 0).numpy()) for image in images]
    else:
        items = [image.unsqueeze(0).numpy() for image in images]
    chatter = logging.getLogger("nncf")  # a line per ignored operation at INFO
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(items),
            subset_size=len(items),
            target_device=nncf.TargetDevice.CPU,
            # asymmetric activation ranges: on realmix a third of the decisions symmetric ones changed
            # (docs/results/export-and-speed.md)
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=keep_float,
        )
    finally:
        chatter.setLevel(level)


def _operations_inside(model, networks: re.Pattern) -> dict[str, bool]:
    """{operation name: whether it belongs to a module `networks` matches}. The traced graph names each operation by
    its module path (/method/decoder/...); OpenVINO's converter renames the ones it fuses (a transposed convolution
    with its BatchNorm becomes Multiply_123), and those belong where all that reads them belongs."""
    inside: dict[str, bool] = {}

    def belongs(op) -> bool:
        name = op.get_friendly_name()
        if name not in inside:
            if name.startswith("/"):
                inside[name] = bool(networks.match(name))
            else:
                inside[name] = False  # until its readers say otherwise (no cycles in a graph, but be safe)
                readers = [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]
                inside[name] = bool(readers) and all(belongs(reader) for reader in readers)
        return inside[name]

    for op in model.get_ordered_ops():
        belongs(op)
    return inside


def _calibration(detector, images) -> torch.Tensor:
    """Calibration images as the Detector takes images (`api.check_images`), at least one."""
    from cada.api import check_images

    images = check_images(images, detector.settings.input_size, detector.settings.resize)
    if len(images) == 0:
        raise ValueError("int8 calibration needs at least one image")
    return images


def _check_export(detector, out: str | Path, input: str, suffix: str) -> Path:
    if input not in INPUTS:
        raise ValueError(f"--input must be one of {', '.join(INPUTS)}, got {input!r}")
    if detector.aligner.needs_class_names:
        raise ValueError(f"the {detector.aligner.name} aligner needs class names at test time and cannot be exported")
    out = Path(out)
    if out.suffix != suffix:
        raise ValueError(f"--out {out}: this format's file ends in {suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_sidecar(detector, out: Path, input: str, precision: str = "float32") -> None:
    """OUT.json: the input, outputs, preprocessing, threshold and calibration, and the run's settings."""
    settings = detector.settings
    size = settings.input_size
    layout = (
        {"layout": "HWC, one image of any size", "resize": f"inside the graph: {RESIZE_RULE}"}
        if input == "raw"
        else {"layout": "NCHW", "resize": f"before the graph, to image_size: {RESIZE_RULE}"}
    )
    sidecar = {
        "format": "cada-onnx" if out.suffix == ".onnx" else "cada-openvino",
        "input": "image",
        "input_kind": input,
        "precision": precision,
        "outputs": output_names(detector),
        "preprocessing": {
            "image_size": size,
            **layout,
            "fit": LETTERBOX_RULE if settings.resize == "letterbox" else SQUASH_RULE,
            **(
                {
                    "tiles": f"inside the graph: {settings.tile} x {settings.tile} tiles of {settings.image_size} "
                    f"pixels, {stride_of(settings.image_size, settings.tile_overlap)} apart, results combined per "
                    "image (cada.tiles)"
                }
                if settings.tile > 1
                else {}
            ),
            "channels": "RGB",
            "dtype": "uint8",
            "normalisation_inside_graph": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        },
        "threshold": detector.threshold,
        "calibration": detector.calibration,
        "decision": "anomalous when score >= threshold",
        "settings": settings.to_dict(),
    }
    if detector.aligner.unfamiliar_reference is not None:  # beyond it, an image is unlike every training image
        sidecar["unfamiliar_reference_distance"] = detector.aligner.unfamiliar_reference
    atomic_write(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")


def _export_model(detector, path: Path, input_name: str, batch_size: int = 1) -> None:
    """The detector from resized uint8 images (NCHW, batch dynamic) to its `output_names`, traced."""
    size = detector.settings.input_size
    example = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8)
    outputs = output_names(detector)
    with warnings.catch_warnings():  # the tracer notes Python numbers fixed at export time: sizes, as intended
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                ExportedDetector(detector).eval(),
                (example,),
                str(path),
                input_names=[input_name],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]},
                opset_version=OPSET,
                dynamo=False,
            )
        except torch.onnx.errors.UnsupportedOperatorError as error:  # e.g. a ViT's bicubic position-embedding resize
            raise ValueError(
                f"a {detector.settings.method} run cannot be exported: {str(error).splitlines()[0]}"
            ) from None


def _export_raw(detector, path: Path) -> None:
    """The raw-image graph: the resize front (torch.export, for its dynamic image size) joined to the traced
    model (the tracer exports the aligners' stable sort, which torch.export's ONNX translation lacks)."""
    import tempfile

    import onnx
    from onnx import compose, version_converter

    with tempfile.TemporaryDirectory(prefix="cada-export-") as scratch:
        front_path, model_path = Path(scratch) / "front.onnx", Path(scratch) / "model.onnx"
        height, width = (torch.export.Dim(name, min=2, max=MAX_SIDE) for name in ("height", "width"))
        # torch.export logs a harmless note while it reasons about the symbolic image size; users need not see it
        symbolic = logging.getLogger("torch.utils._sympy.interp")
        level = symbolic.level
        symbolic.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    RawImageFront(detector.settings.input_size, detector.settings.resize),
                    (torch.zeros(97, 131, 3, dtype=torch.uint8),),
                    str(front_path),
                    input_names=["image"],
                    output_names=["resized"],
                    dynamic_shapes={"image": {0: height, 1: width}},
                    opset_version=RAW_OPSET,
                    dynamo=True,
                    verbose=False,
                )
        finally:
            symbolic.setLevel(level)
        _export_model(detector, model_path, "resized_image")
        front = onnx.load(str(front_path))
        model = version_converter.convert_version(onnx.load(str(model_path)), RAW_OPSET)
    front = compose.add_prefix(front, "resize/", rename_inputs=False, rename_outputs=False)
    front.ir_version = model.ir_version = max(front.ir_version, model.ir_version)
    joined = compose.merge_models(front, model, io_map=[("resized", "resized_image")])
    onnx.checker.check_model(joined)
    onnx.save(joined, str(path))
