"""`cada demo`: a synthetic four-product data set, the default method trained on it, both protocols evaluated,
beside what one threshold does to the default's two maps taken raw."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cada.config_files import make_settings
from cada.files import check_output, printable, write_json
from cada.workflows.common import find_split
from cada.workflows.evaluate import evaluate
from cada.workflows.train import train

log = logging.getLogger(__name__)


def demo(
    out: str | Path,
    *,
    seed: int = 0,
    iters: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Train into OUT/run, evaluate into OUT/results.json (with the raw maps' rows under "raw_maps"); the results
    dict."""
    from cada.data.synthetic import generate_dataset

    started = time.perf_counter()
    out = Path(out)
    check_output(out, "--out", "folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {printable(out)} is not empty (an earlier demo?): choose another folder, or add "
            "--overwrite to replace the demo's run and results.json"
        )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cada-demo-") as scratch:
        data = generate_dataset(Path(scratch) / "synthetic", seed=seed)
        settings = make_settings("cpu", seed=seed, iters=iters)
        log.info(f"demo: synthetic data ({data}), preset cpu, {settings.method} + {settings.align}")
        detector = train(
            settings, data, out / "run", progress=progress, overwrite=overwrite, device=device, precision=precision
        )
        raw = raw_map_rows(detector, find_split(data, "test", quiet=True))
        results = evaluate(detector, data, None, progress=progress)
    results["raw_maps"] = raw
    write_json(out / "results.json", results)
    log.info(f"wrote {out / 'results.json'}")
    default = {r["protocol"]: r["i_auroc"] for r in results["rows"] if r["align"] == settings.align}
    lines = [(name, row["absolute-unified"], row["model-unified"]) for name, row in raw.items()]
    lines.append(
        (f"the default ({settings.method} + {settings.align})", default["absolute-unified"], default["model-unified"])
    )
    width = max(len(name) for name, _, _ in lines)
    log.info(
        "I-AUROC with one threshold for every product (pooled) and with each product's own (per product):\n"
        + "\n".join(f"  {name:<{width}}  pooled {100 * a:5.1f}   per product {100 * m:5.1f}" for name, a, m in lines)
    )
    log.info(f"demo finished in {time.perf_counter() - started:.0f} s")
    return results


@torch.inference_mode()
def raw_map_rows(detector, samples) -> dict[str, dict[str, float]]:
    """{map: {"absolute-unified": I-AUROC, "model-unified": I-AUROC}} of each of the method's component maps taken
    raw (scored as the pipeline scores a map, with no normalisation and no aligner): the scales the default's
    look-alike normalisation puts on one footing. Empty for a method without component maps."""
    from cada.data.dataset import load_all, normalize
    from cada.evaluate import image_only_metrics
    from cada.scoring import image_score, smooth

    if not hasattr(detector.method, "component_maps"):
        return {}
    images = load_all(samples, detector.settings.input_size)[0]
    labels = np.array([sample.label for sample in samples])
    classes = np.array([sample.class_name for sample in samples])
    settings, device = detector.settings, detector.device
    scores: tuple[list, list] = ([], [])
    for start in range(0, len(images), 16):
        *maps, _ = detector.method.component_maps(normalize(images[start : start + 16], device))
        for kept, raw in zip(scores, maps):
            kept.append(image_score(smooth(raw.float(), settings.smoothing_sigma), settings.top_fraction).cpu())
    rows = {}
    for name, kept in zip(("RevDist's map, raw", "PatchCore's map, raw"), scores):
        pooled, per_product = image_only_metrics(torch.cat(kept).numpy(), labels, classes)
        rows[name] = {"absolute-unified": pooled["i_auroc"], "model-unified": per_product["i_auroc"]}
    return rows
