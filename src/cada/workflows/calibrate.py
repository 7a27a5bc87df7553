"""`cada calibrate`: a run's one threshold, from normal images at a target false-positive rate or F1-optimal on
labelled validation images, written into the run's config (its weights stay as they are)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cada.threshold import check_fpr
from cada.workflows.common import find_split


def calibrate(
    run: str | Path,
    *,
    normal: Sequence[str | Path] = (),
    val: str | Path | None = None,
    fpr: float = 0.01,
    format: str = "auto",
    cache_dir="auto",
    device: str = "auto",
    precision: str = "auto",
) -> tuple[dict, dict | None]:
    """(the new calibration, the one it replaced or None): from the images in the `normal` folders at `fpr`, or
    from the labelled test split of `val` (F1-optimal)."""
    from cada.api import Detector
    from cada.checkpoint import update_config
    from cada.data.dataset import load_all
    from cada.data.folder import folder_samples

    if val is None and not normal:
        raise ValueError("give folders of normal images (--normal), or a labelled validation set (--val)")
    if val is None:
        check_fpr(fpr, "--fpr")  # before loading and scoring
    detector = Detector.load(run, device=device, precision=precision)
    previous = detector.calibration
    size, resize = detector.settings.input_size, detector.settings.resize
    if val is not None:
        samples = find_split(val, "test", format)
        images, samples = load_all(samples, size, cache_dir=cache_dir, resize=resize)
        detector.calibrate_f1(images, [s.label for s in samples], source=f"{len(samples)} labelled images of {val}")
    else:
        samples = folder_samples(normal=normal)
        images, samples = load_all(samples, size, cache_dir=cache_dir, resize=resize)
        detector.calibrate(images, fpr, source=f"{len(samples)} normal images in {', '.join(map(str, normal))}")
    update_config(run, calibration=detector.calibration)
    assert detector.calibration is not None  # calibrate set it
    return detector.calibration, previous
