"""One decision threshold for every image: how it is chosen, and what it does on labelled data.

Decision rule everywhere: an image is anomalous when its score >= threshold (as in precision-recall curves).
Thresholds are chosen on held-out normal images (a target false-positive rate) or on a labelled validation
set (F1-optimal), never on the test set.

Margin rule: a threshold never sits on or next to a calibration score, where another backend's rounding (ONNX
differs from PyTorch by ~1e-6) would flip that image's decision. It sits in the middle of the gap between the
highest score that must stay normal and the next higher score; when no score is higher, MARGIN x the spread of
the scores above the highest one (or MARGIN x max(|highest|, 1) when all scores are equal). Scores closer
together than the backends' rounding cannot be told apart by any threshold.
"""

from __future__ import annotations

import math

import numpy as np

from cada.metrics import f1_max

MARGIN = 0.05  # of the score spread, above the highest score when every calibration image must stay normal


def _above(scores: np.ndarray, highest_normal: float) -> float:
    """The threshold above `highest_normal` by the margin rule (see the module docstring), in the scores' precision."""
    higher = scores[scores > highest_normal]
    if higher.size:
        threshold = (float(highest_normal) + float(higher.min())) / 2
    else:
        spread = float(highest_normal - scores.min())
        threshold = float(highest_normal) + MARGIN * (spread if spread > 0 else max(abs(float(highest_normal)), 1.0))
    # Decisions compare in the scores' own precision (float32 from the models): never round back onto the score.
    own = scores.dtype.type
    return float(max(own(threshold), np.nextafter(own(highest_normal), own(np.inf))))


def _checked(scores) -> np.ndarray:
    scores = np.asarray(scores).ravel()
    if scores.size == 0:
        raise ValueError("calibration needs at least one image")
    scores = scores if np.issubdtype(scores.dtype, np.floating) else scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores contain NaN or infinite values")
    return scores


def threshold_at_fpr(normal_scores, fpr: float, *, new_images: bool = True) -> float:
    """The lowest threshold (by the margin rule) at which a new normal image is flagged with probability at most
    `fpr`, for new images exchangeable with these (split-conformal): of these n images the top m - 1 may score >=
    threshold, m = floor(fpr (n + 1)), and the threshold sits above the m-th, which a new image passes when it lands
    among the top m of the n + 1, with probability m / (n + 1). Flagging floor(fpr n) of them instead, "at most fpr of
    these images", would flag up to 1 / (n + 1) more of the new ones: 2% instead of 1% with 100 images. With fewer
    than 1 / fpr - 1 images no threshold can (`unresolved_fpr`); it then sits above all of them.

    `new_images=False`: at most `fpr` of these images themselves, for an after-the-fact reference on the very images
    it is applied to (evaluate's threshold on test normals).
    """
    check_fpr(fpr)
    scores = _checked(normal_scores)
    if new_images:
        allowed = max(0, math.floor(fpr * (scores.size + 1) + 1e-9) - 1)
    else:
        allowed = math.floor(fpr * scores.size + 1e-9)
    return _above(scores, np.sort(scores)[::-1][allowed])


def check_fpr(fpr, name: str = "the target false-positive rate") -> float:
    """`fpr` if it is a number in [0, 1), else ValueError naming it (NaN included): checked before any work."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating)) or not 0 <= fpr < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {fpr!r}")
    return float(fpr)


def unresolved_fpr(n_normal: int, fpr: float) -> str | None:
    """Why `n_normal` calibration images cannot give a false-positive rate of `fpr` (0 < fpr), or None when they
    can: a new normal image scores above all of them with probability 1 / (n + 1), more than `fpr`."""
    check_fpr(fpr)
    if fpr <= 0 or fpr * (n_normal + 1) >= 1 - 1e-9:
        return None
    return (
        f"{n_normal} normal images cannot resolve a false-positive rate of {fpr}: the threshold is set above all of "
        f"them, and a new normal image scores above all {n_normal} with probability 1/{n_normal + 1} = "
        f"{1 / (n_normal + 1):.2g} (use at least {math.ceil(1 / fpr - 1 - 1e-9)} images)"
    )


def threshold_f1(scores, labels) -> float:
    """The threshold that maximises F1 on labelled validation images, placed by the margin rule."""
    scores = _checked(scores)
    lowest_flagged = f1_max(scores, labels)[1]
    below = scores[scores < lowest_flagged]
    if below.size:
        return _above(scores, below.max())
    # Every image is flagged: as far below the lowest score as the margin rule puts a threshold above the highest.
    spread = scores.max() - lowest_flagged
    return float(lowest_flagged - MARGIN * (spread if spread > 0 else max(abs(lowest_flagged), 1.0)))


def check_calibration(calibration: dict | None) -> dict | None:
    """A stored calibration (a run's config.json, an ONNX sidecar) as it is, or ValueError: a NaN threshold would
    call every image normal, silently."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be a mapping or null, got {calibration!r}")
    for key in ("threshold", "base_threshold"):
        check_threshold(calibration.get(key), f"calibration.{key}")
    return calibration


def check_threshold(value, name: str = "threshold") -> float:
    """`value` if it is a finite number, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}: calibrate the run again (cada calibrate)")
    return value


def decision_metrics(scores, labels, threshold: float) -> dict:
    """False-positive rate, recall, precision and F1 of `score >= threshold` (None where undefined)."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
    flagged = scores >= threshold
    true_positives = int((flagged & labels).sum())
    false_positives = int((flagged & ~labels).sum())
    normals, anomalous = int((~labels).sum()), int(labels.sum())
    precision = true_positives / (true_positives + false_positives) if flagged.any() else None
    recall = true_positives / anomalous if anomalous else None
    f1 = (
        2 * true_positives / (2 * true_positives + false_positives + anomalous - true_positives)
        if anomalous or false_positives
        else None
    )
    return {"fpr": false_positives / normals if normals else None, "recall": recall, "precision": precision, "f1": f1}
