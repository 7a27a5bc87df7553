"""`cada evaluate`: both protocols' metrics of a run on a test set, logged as tables, written as JSON, plots and
an HTML report on request."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cada.files import printable, write_json
from cada.workflows.common import find_split

log = logging.getLogger(__name__)


def evaluate(
    detector,
    data: str | Path,
    json_path: str | Path | None = None,
    *,
    progress: bool = True,
    plots_dir: str | Path | None = None,
    samples=None,
    cache_dir="auto",
    report_dir: str | Path | None = None,
    pixel_resolution: str = "model",
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Evaluate a Detector (or a run folder) on the test split of `data` (or on `samples`): the results dict
    (`cada evaluate --json`), its tables logged; JSON, plots and report written when asked."""
    from cada.api import Detector
    from cada.data.duplicates import warn_duplicates
    from cada.engine.device import device_name
    from cada.engine.distributed import is_main, world_size
    from cada.evaluate import (
        collect,
        detector_results,
        format_calibration_check,
        format_decisions,
        format_per_class,
        format_per_product,
        format_table,
    )

    if isinstance(detector, (str, Path)):
        detector = Detector.load(detector, device=device, precision=precision)
    data = Path(data)
    json_path, plots_dir, report_dir = (None if p is None else Path(p) for p in (json_path, plots_dir, report_dir))
    if report_dir and world_size() > 1:
        raise ValueError(
            "--report shows every image's map, which stay with their process under torchrun: write "
            "the report from a single-process `cada evaluate`"
        )
    if samples is None:
        samples = find_split(data, "test", quiet=not is_main())
    for label, kind, where in ((0, "normal", "test/good"), (1, "anomalous", "test/<defect>")):
        if not any(sample.label == label for sample in samples):
            raise ValueError(
                f"the {len(samples)} test images of {printable(data)} hold no {kind} image ({where}): the metrics "
                "compare normal with anomalous images, so evaluation needs both"
            )
    trained_on = detector.training_info.get("data")
    if trained_on and Path(trained_on).is_dir() and is_main():
        try:
            warn_duplicates(
                find_split(trained_on, "train", detector.training_info.get("format", "auto"), quiet=True), samples
            )
        except (FileNotFoundError, ValueError):
            pass  # the training data moved or changed layout: nothing to compare with
    started = time.perf_counter()
    outputs = collect(detector, samples, progress=progress, cache_dir=cache_dir, pixel_resolution=pixel_resolution)
    results = detector_results(detector, outputs)
    results["meta"] = {
        "data": printable(data),
        "n_test_images": len(outputs.samples),
        "backbone": detector.settings.backbone,
        "image_size": detector.settings.image_size,
        "resize": detector.settings.resize,
        "pixel_resolution": pixel_resolution,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "device": device_name(detector.device),
        "precision": detector.precision_name,
    }
    if world_size() > 1:
        results["meta"]["processes"] = world_size()
    if not is_main():  # every process computed the same results; rank 0 reports them
        return results
    say = log.info
    say(format_table(results))
    say("per class:")
    say(format_per_class(results))
    if detector.calibration:
        say(f"at the stored threshold ({detector.calibration['how']}, {detector.calibration['source']}):")
        say(format_decisions(results))
        for line in format_calibration_check(results):
            say(line)
    say("per product, at one pooled threshold (oracle: each product's training z-score, class names known):")
    say(format_per_product(results))
    figures = []  # (title, PNG) for the report
    if plots_dir or report_dir:
        from cada.report.plots import loss_curves, score_distributions

        folder = plots_dir or report_dir
        assert folder is not None
        figure = score_distributions(outputs, folder / "score_distributions.png", detector.settings.align)
        say(f"wrote {figure}")
        figures.append(("Image scores per class", figure))
        if detector.training_log:
            figure = loss_curves(detector.training_log, folder / "loss_curves.png")
            say(f"wrote {figure}")
            figures.append(("Training loss", figure))
    if report_dir:
        from cada.report.html import write_report

        say(f"wrote {write_report(report_dir, results, outputs, detector, figures)}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, results)
        say(f"wrote {json_path}")
    return results
