"""`cada ablate`: the paper's Tables 3-5. The base is trained once (or reused), its training statistics and test
outputs cached, then every aligner variant is fitted on those caches; `noise` also compares (u, gamma) with
(u, sigma) on a base trained with anomalous images mixed into its training set (as BTAD's noisy set)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cada.config import Settings
from cada.files import check_output, write_json
from cada.workflows.common import find_split
from cada.workflows.train import train

log = logging.getLogger(__name__)


def ablate(
    data: str | Path,
    out: str | Path,
    settings: Settings,
    *,
    run: str | Path | None = None,
    weights: str | None = None,
    noise: float = 0.0,
    format: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    logger: str = "csv",
) -> dict:
    """The tables (logged, and written to OUT/ablation.json); the base is trained into OUT/base unless `run`."""
    from cada.ablation import Ablation, format_rows, noisy_split, table_3, table_4, table_5
    from cada.api import Detector

    data, out = Path(data), Path(out)
    check_output(out / "ablation.json", "--out", "file", inputs=[data], overwrite=overwrite)
    train_samples = find_split(data, "train", format)
    test_samples = find_split(data, "test", format, quiet=True)
    settings = Settings.from_dict({**settings.to_dict(), "align": "none"})  # the base alone
    started = time.perf_counter()
    if run:
        detector = Detector.load(run, device=device, precision=precision)
        # The noisy base (--noise) must be trained exactly as the reused one was.
        settings = Settings.from_dict({**detector.settings.to_dict(), "align": "none"})
    else:
        detector = train(
            settings,
            data,
            out / "base",
            weights=weights,
            progress=progress,
            overwrite=overwrite,
            device=device,
            precision=precision,
            logger=logger,
        )
    base_seconds = time.perf_counter() - started

    def run_tables(ablation: Ablation, tables) -> dict:
        report: dict[str, list[dict]] = {}
        base = ablation.base_rows()["absolute-unified"]
        for title, variants in tables:
            entries: list[tuple[str, dict, float | None]] = [("base (no alignment)", base, None)]
            for variant in variants:
                rows, seconds = ablation.run(variant)
                entries.append((variant.label, rows["absolute-unified"], seconds))
                report.setdefault(title, []).append({"variant": variant.label, "seconds": round(seconds, 2), **rows})
            log.info(format_rows(title, entries) + "\n")
        return report

    ablation = Ablation(detector, train_samples, test_samples, progress=progress)
    log.info(
        f"base: trained or loaded in {base_seconds:.0f} s; cached training statistics and test outputs in "
        f"{ablation.cache_seconds:.0f} s. Each variant below only fits an aligner on those caches.\n"
    )
    tables = [
        ("Table 3: regressor structure, dropout, score reduction (absolute-unified)", table_3()),
        ("Table 4: class-aware or agnostic (absolute-unified)", table_4()),
        ("Table 5: (u, gamma) or (u, sigma) (absolute-unified)", table_5()),
    ]
    report = {
        "base_seconds": round(base_seconds, 1),
        "cache_seconds": round(ablation.cache_seconds, 1),
        "tables": run_tables(ablation, tables),
    }
    if noise:
        noisy_train, reduced_test = noisy_split(train_samples, test_samples, noise, settings.seed)
        moved = len(noisy_train) - len(train_samples)
        log.info(
            f"noisy training set: {moved} anomalous test images ({noise:.0%} per class) moved into training; "
            f"both bases below are evaluated on the {len(reduced_test)} remaining test images.\n"
        )
        clean = Ablation(detector, train_samples, reduced_test, progress=progress)
        noisy_detector = Detector(settings, weights_path=weights, device=device, precision=precision).fit(
            noisy_train, progress=progress
        )
        noisy = Ablation(noisy_detector, noisy_train, reduced_test, progress=progress)
        report["noise"] = {
            "fraction": noise,
            "moved": moved,
            "clean": run_tables(clean, [("Table 5, clean training set", table_5())]),
            "noisy": run_tables(noisy, [(f"Table 5, noisy training set ({noise:.0%})", table_5())]),
        }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", report)
    log.info(f"wrote {out / 'ablation.json'}")
    return report
