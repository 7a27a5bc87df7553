"""`cada demo`: a synthetic four-product data set, the default method trained on it, both protocols evaluated."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from cada.config_files import make_settings
from cada.files import check_output, printable
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
    """Train into OUT/run, evaluate into OUT/results.json; the results dict."""
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
        results = evaluate(detector, data, out / "results.json", progress=progress)
    rows = {(r["align"], r["protocol"]): r for r in results["rows"]}
    pooled, base = rows[(settings.align, "absolute-unified")], rows[("none", "absolute-unified")]
    own = rows[(settings.align, "model-unified")]
    log.info(
        f"I-AUROC with one threshold for every product (absolute-unified): {100 * pooled['i_auroc']:.1f} "
        f"({100 * base['i_auroc']:.1f} without the aligner {settings.align}); with each product's own threshold "
        f"(model-unified): {100 * own['i_auroc']:.1f}"
    )
    log.info(f"demo finished in {time.perf_counter() - started:.0f} s")
    return results
