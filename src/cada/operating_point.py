"""The operating point at prediction: the run's stored threshold, or one chosen now without recalibrating.

`cada calibrate` (and `cada train --holdout`) keep the aligned scores of the calibration's normal images in the
run's calibration (config.json, and an ONNX sidecar): `normal_scores`. A new target false-positive rate is then
one `threshold_at_fpr` over them, the same rule calibration used, so asking again for the calibrated rate gives
the stored threshold exactly. `--threshold T` sets the threshold itself.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from cada.threshold import check_fpr, check_threshold, threshold_at_fpr, unresolved_fpr

SCORES_KEY = "normal_scores"


def stored_scores(calibration: dict | None) -> np.ndarray | None:
    """The calibration's normal aligned scores as float32 (the models' precision), None when it has none."""
    if not calibration or calibration.get(SCORES_KEY) is None:
        return None
    scores = calibration[SCORES_KEY]
    if not isinstance(scores, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores
    ):
        raise ValueError(
            f"the stored calibration scores ({SCORES_KEY}) are not a list of finite numbers: calibrate "
            "the run again (cada calibrate)"
        )
    return np.asarray(scores, dtype=np.float32)


def without_scores(calibration: dict | None) -> dict | None:
    """The calibration as shown to people (the scores themselves are long and said in n_normal)."""
    return None if calibration is None else {k: v for k, v in calibration.items() if k != SCORES_KEY}


def describe_calibration(calibration: dict) -> str:
    source = calibration.get("source") or "unnamed images"
    if calibration.get("how") == "fpr":
        return f"at false-positive rate {calibration.get('target_fpr')} from {source}"
    if calibration.get("how") == "f1":
        return f"F1-optimal on labelled validation images from {source}"
    return f"from {source}"


def choose_threshold(
    calibration: dict | None, fpr: float | None = None, threshold: float | None = None, where: str = "in the run"
) -> tuple[float | None, str | None]:
    """(threshold, where it comes from, in words) for prediction.

    threshold: that value. fpr: the threshold at that false-positive rate over the stored calibration scores
    (ValueError when the run has none). Neither: the stored threshold (None for an uncalibrated run). `where`
    says where the calibration is kept, for the messages.
    """
    if fpr is not None and threshold is not None:
        raise ValueError("give --fpr or --threshold, not both")
    if threshold is not None:
        return float(check_threshold(threshold, "--threshold")), "given with --threshold"
    if fpr is not None:
        check_fpr(fpr, "--fpr")
        scores = stored_scores(calibration)
        if calibration is None or scores is None:
            state = (
                "has no calibration"
                if calibration is None
                else "was calibrated without keeping the calibration scores (by an older cada)"
            )
            raise ValueError(
                f"--fpr needs the calibration scores stored {where}, and this one {state}: run "
                "`cada calibrate RUN --normal FOLDER` once, and export again for a .onnx model (or "
                "give --threshold)"
            )
        if not len(scores):
            raise ValueError(
                "--fpr needs normal calibration images, and this run was calibrated on anomalous images "
                "only: run `cada calibrate RUN --normal FOLDER` (or give --threshold)"
            )
        unresolved = unresolved_fpr(len(scores), fpr)
        if unresolved:
            warnings.warn(unresolved)
        chosen = threshold_at_fpr(scores, fpr)
        return chosen, (
            f"at false-positive rate {fpr} over the {len(scores)} calibration scores stored {where} "
            f"({calibration.get('source') or 'unnamed images'})"
        )
    if calibration is None:
        return None, None
    return calibration["threshold"], f"stored {where}: {describe_calibration(calibration)}"
