"""`cada export`: its arguments; the graph is written by cada.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from cada.files import check_output
from cada.workflows import run_files
from cada.workflows.export import CALIBRATION_IMAGES


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder")
    parser.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx (onnxruntime), or openvino: OpenVINO IR, OUT.xml with OUT.bin (needs the openvino package)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the .onnx (or .xml) file to write (threshold and preprocessing: .json beside it)",
    )
    parser.add_argument(
        "--input",
        choices=("resized", "raw"),
        default="resized",
        help="resized: uint8 NCHW batches already resized to the run's image size (cada.data.resize's rule); raw: "
        "one uint8 H x W x 3 RGB image of any size, resized inside the graph by the same rule, to the last bit",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="with --format openvino: quantise the networks to int8 (NNCF), calibrated on the run's training images",
    )
    parser.add_argument(
        "--calibration-data", help="with --int8: a data root whose training images calibrate (default: the run's)"
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help=f"with --int8: how many training images calibrate (default {CALIBRATION_IMAGES})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .json)")


def run(args) -> int:
    from cada.api import Detector
    from cada.export import export_onnx, export_openvino, import_nncf
    from cada.runtime import sidecar_path
    from cada.workflows.export import calibration_images

    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise ValueError('ONNX export needs the onnx package: pip install -e ".[export]"') from None
    if args.input == "raw":
        try:
            import onnxscript  # noqa: F401 - torch.export's ONNX translation (the raw graph's resize) needs it
        except ImportError:
            raise ValueError('--input raw needs the onnxscript package: pip install -e ".[export]"') from None
    if args.format == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ValueError("--format openvino needs the openvino package: pip install openvino") from None
    if args.int8:
        if args.format != "openvino":
            raise ValueError("--int8 quantises OpenVINO models: add --format openvino")
        import_nncf()  # before loading anything: one line if it is missing
    elif args.calibration_data:
        raise ValueError("--calibration-data calibrates --int8: add --int8")
    protected = run_files(args.run)
    out = Path(args.out)
    outputs = [(out, "--out"), (sidecar_path(out), "--out's sidecar")]
    if args.format == "openvino":
        outputs.append((out.with_suffix(".bin"), "--out's weights"))
    for path, option in outputs:
        check_output(path, option, "file", protected=protected, overwrite=args.overwrite)
    detector = Detector.load(args.run, device="cpu")
    if args.format == "openvino":
        images = calibration_images(detector, args.calibration_data, args.calibration_images) if args.int8 else None
        export_openvino(detector, out, input=args.input, calibration_images=images)
    else:
        export_onnx(detector, out, input=args.input)
    print("wrote " + ", ".join(str(path) for path, _ in outputs))
    return 0
