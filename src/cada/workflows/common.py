"""What the workflows share: finding a data split (saying its layout), a run's own files, a calibration in words."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_files(run: str | Path) -> list[Path]:
    """What no output may be written over: a run's weights, settings and checkpoint."""
    from cada.checkpoint import CONFIG_FILE, RESUME_FOLDER, WEIGHTS_FILE

    return [Path(run) / name for name in (WEIGHTS_FILE, CONFIG_FILE, RESUME_FOLDER)]


def find_split(root, split: str, format: str = "auto", quiet: bool = False):
    """The samples of `split` ("train"/"test") of the data root, its layout recognised (and said) with "auto"."""
    from cada.data.layouts import find_samples

    found, chosen = find_samples(root, split, format)
    if format == "auto" and not quiet:
        log.info("data layout of %s: %s", root, chosen)
    return found


def describe_calibration(calibration: dict) -> str:
    how = (
        f"at false-positive rate {calibration['target_fpr']}"
        if calibration["how"] == "fpr"
        else "F1-optimal on labelled validation images"
    )
    return (
        f"threshold {calibration['threshold']:.4f} (aligned score; base map {calibration['base_threshold']:.4f}) "
        f"chosen {how} from {calibration['source']}"
    )
