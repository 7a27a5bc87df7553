"""Inference and training speed of RevDist + CADA on this machine, and peak memory.

    python benchmarks/speed.py [--threads 2] [--batches 5]
    python benchmarks/speed.py --compare-anomalib [--rounds 5] [--threads 2] [--run RUN] [--calibration-images 32]

Inference: the whole detector path (encoder, decoder, map, smoothing, image score, CADA statistics), batch 16
of 256x256 images under torch.inference_mode. Training: base-method iterations (batch 16) on features of the
frozen encoder, the way `cada train` runs them, plus the cost of encoding the training images once.
Random weights: speed does not depend on them. Each backbone runs in its own process so peak memory is its own.

--compare-anomalib (needs anomalib, openvino and nncf): in one process, round-robin (each round times one batch of
16 random 256 x 256 images of each, in turn), random weights, wide_resnet50_2: cada's RevDist + CADA in PyTorch
(`Detector.infer`: normalisation, encoder, bottleneck, decoder, map, Gaussian smoothing, top-1% image score, CADA's
statistics), as exported to ONNX (onnxruntime), to OpenVINO and to OpenVINO int8 (`cada export --int8`,
calibrated on --calibration-images random images: speed does not depend on them); anomalib's Reverse Distillation
torch model (normalisation and its forward: map with its 33x33 Gaussian blur, max score), and its own OpenVINO
export in float32 and int8 (see add_anomalib). With --run, the same four for a trained run (the default method's),
its int8 calibrated on its own training images. Prints each round's images/s, the medians and the median of the
per-round ratios to anomalib's PyTorch model.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

BACKBONES = ("efficientnet_lite0", "wide_resnet50_2")


def measure(backbone: str, threads: int, batches: int) -> None:
    import torch

    from cada import Detector
    from cada.config import preset
    from cada.data.dataset import normalize
    from cada.methods.revdist import flattened_cosine_loss

    torch.set_num_threads(threads)
    settings = preset("cpu", "revdist")
    settings.backbone = backbone
    detector = Detector(settings, pretrained=False)
    detector.fitted = True  # timing only: random weights run as fast as trained ones
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)

    detector.infer(images)  # warm-up: first calls pick kernels
    started = time.perf_counter()
    for _ in range(batches):
        detector.infer(images)
    inference = 16 * batches / (time.perf_counter() - started)

    method = detector.method
    started = time.perf_counter()
    with torch.no_grad():
        encoded = method.encoder(normalize(images))
    encoding = 16 / (time.perf_counter() - started)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=2e-3)
    method.train()
    steps = max(2, batches // 2)
    for step in range(steps + 1):
        if step == 1:  # the first step is warm-up
            started = time.perf_counter()
        _, decoded = method.reconstruct(encoded)
        loss = flattened_cosine_loss(encoded, decoded)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    training = 16 * steps / (time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{backbone:<20} inference {inference:6.1f} img/s   training step {training:6.1f} img/s   "
        f"encoding (once per training image) {encoding:6.1f} img/s   peak RSS {peak:5.2f} GiB",
        flush=True,
    )


def compare_anomalib(threads: int, rounds: int, run: str | None, calibration_images: int) -> None:
    import statistics
    import tempfile
    from pathlib import Path

    import torch

    from cada import Detector
    from cada.config import preset
    from cada.export import export_onnx, export_openvino
    from cada.runtime import exported_scorer
    from cada.workflows.export import calibration_images as run_calibration_images

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    # speed does not depend on what calibrates: random images do for the random-weight models
    random_calibration = torch.randint(0, 256, (calibration_images, 3, 256, 256), dtype=torch.uint8)
    scratch = Path(tempfile.mkdtemp(prefix="cada-speed-"))
    runners: dict = {}

    def add_cada(label: str, detector, calibration: torch.Tensor) -> None:
        runners[f"{label} PyTorch fp32"] = lambda: detector.infer(images)
        name = label.replace(" ", "-")
        for kind, path in (
            ("ONNX fp32", export_onnx(detector, scratch / f"{name}.onnx")),
            ("OpenVINO fp32", export_openvino(detector, scratch / f"{name}.xml")),
            ("OpenVINO int8", export_openvino(detector, scratch / f"{name}-int8.xml", calibration_images=calibration)),
        ):
            score = exported_scorer(path)[0]
            runners[f"{label} {kind}"] = lambda score=score: score(images)

    settings = preset("cpu", "revdist")
    settings.backbone, settings.align = "wide_resnet50_2", "cada"
    revdist = Detector(settings, pretrained=False, device="cpu", precision="fp32")
    revdist.fitted = True  # timing only: random weights run as fast as trained ones
    add_cada("cada RevDist", revdist, random_calibration)
    add_anomalib(runners, images, random_calibration, scratch)
    if run:
        default = Detector.load(run, device="cpu")
        add_cada("cada default", default, run_calibration_images(default, count=calibration_images))
    for run_once in runners.values():  # warm-up: the first calls pick kernels
        run_once()
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    print(f"batch 16, 256x256, {threads} threads, {rounds} rounds, round-robin (images/s)")
    for round_index in range(rounds):
        for name, run_once in runners.items():
            started = time.perf_counter()
            run_once()
            speeds[name].append(16 / (time.perf_counter() - started))
        print(f"round {round_index + 1}: " + "   ".join(f"{name} {speeds[name][-1]:.2f}" for name in runners))
    reference = speeds[ANOMALIB_FP32]
    for name in runners:
        ratio = statistics.median(a / b for a, b in zip(speeds[name], reference))
        print(f"{name:<32} median {statistics.median(speeds[name]):6.2f} img/s   ratio to {ANOMALIB_FP32} {ratio:5.2f}")


ANOMALIB_FP32 = "anomalib RD PyTorch fp32"


def add_anomalib(runners: dict, images, calibration, scratch) -> None:
    """anomalib's Reverse Distillation (wide_resnet50_2, random weights): its torch model, then its own OpenVINO
    export (`to_openvino`, the whole Lightning model with pre- and post-processing) in float32 and quantised as its
    INT8_PTQ does (`nncf.quantize` with NNCF's defaults); both compiled like cada's, float32 where not int8."""
    import nncf
    import openvino
    import torch
    from anomalib.models import ReverseDistillation
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    from cada.data.dataset import normalize

    model = ReverseDistillationModel(
        "wide_resnet50_2", (256, 256), ["layer1", "layer2", "layer3"], AnomalyMapGenerationMode.ADD, pre_trained=False
    ).eval()

    def run_torch():
        with torch.inference_mode():
            return model(normalize(images))

    runners[ANOMALIB_FP32] = run_torch
    try:
        lightning = ReverseDistillation(backbone="wide_resnet50_2", pre_trained=False)
        # a trained model's normalisation statistics and thresholds (untrained they are NaN, which OpenVINO's int8
        # transformations refuse)
        for name in ("_image_threshold", "_pixel_threshold", "image_min", "pixel_min", "image_max", "pixel_max"):
            getattr(lightning.post_processor, name).fill_(
                1.0 if name.endswith("max") else 0.5 if "threshold" in name else 0.0
            )
        exported = lightning.to_openvino(scratch / "anomalib", input_size=(256, 256))
    except Exception as error:  # noqa: BLE001 - a peer's export failing is a result to report, not a crash
        print(f"anomalib's OpenVINO export failed here ({type(error).__name__}: {error}); its OpenVINO rows skipped")
        return
    float_images = (images.float() / 255).numpy()
    fp32 = openvino.Core().read_model(exported)
    int8 = nncf.quantize(fp32, nncf.Dataset([(image.float() / 255).unsqueeze(0).numpy() for image in calibration]))
    for kind, ov_model in (("fp32", fp32), ("int8", int8)):
        compiled = openvino.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        runners[f"anomalib RD OpenVINO {kind}"] = lambda compiled=compiled: compiled(float_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--compare-anomalib", action="store_true", help="RevDist against anomalib's, round-robin")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run", help="with --compare-anomalib: also time this trained run (the default method's)")
    parser.add_argument("--calibration-images", type=int, default=32, help="int8 calibration images")
    parser.add_argument("--backbone", help=argparse.SUPPRESS)  # used by the per-backbone child process
    args = parser.parse_args()
    if args.compare_anomalib:
        compare_anomalib(args.threads, args.rounds, args.run, args.calibration_images)
        return
    if args.backbone:
        measure(args.backbone, args.threads, args.batches)
        return
    print(f"batch 16, 256x256, {args.threads} threads")
    for backbone in BACKBONES:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--backbone",
                backbone,
                "--threads",
                str(args.threads),
                "--batches",
                str(args.batches),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
