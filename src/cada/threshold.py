"""One decision threshold for every image: how it is chosen, and what it does on labelled data.

Decision rule everywhere: an image is anomalous when its score >= threshold (as in precision-recall curves).
Thresholds are chosen on held-out normal images (a target false-positive rate) or on a labelled validation
set (F1-optimal), never on the test set.
"""

from __future__ import annotations

import math

import numpy as np

from cada.metrics import f1_max


def threshold_at_fpr(normal_scores, fpr: float) -> float:
    """The lowest threshold at which at most `fpr` of these normal images are flagged.

    With n images, at most floor(fpr * n) may score >= threshold; the threshold sits just above the next one.
    """
    # Keep the scores' own precision: a float64 "just above" a float32 score rounds back onto it.
    scores = np.sort(np.asarray(normal_scores).ravel())[::-1]
    if scores.size == 0:
        raise ValueError("calibration needs at least one normal image")
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores contain NaN or infinite values")
    if not 0 <= fpr < 1:
        raise ValueError(f"the target false-positive rate must be in [0, 1), got {fpr}")
    allowed = math.floor(fpr * scores.size + 1e-9)
    if allowed >= scores.size:
        return float(scores[-1])
    return float(np.nextafter(scores[allowed], np.array(np.inf, scores.dtype)))


def threshold_f1(scores, labels) -> float:
    """The threshold that maximises F1 on labelled validation images."""
    return float(f1_max(scores, labels)[1])


def decision_metrics(scores, labels, threshold: float) -> dict:
    """False-positive rate, recall, precision and F1 of `score >= threshold` (None where undefined)."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
    flagged = scores >= threshold
    true_positives = int((flagged & labels).sum())
    false_positives = int((flagged & ~labels).sum())
    normals, anomalous = int((~labels).sum()), int(labels.sum())
    precision = true_positives / (true_positives + false_positives) if flagged.any() else None
    recall = true_positives / anomalous if anomalous else None
    f1 = (2 * true_positives / (2 * true_positives + false_positives + anomalous - true_positives)
          if anomalous or false_positives else None)
    return {"fpr": false_positives / normals if normals else None, "recall": recall, "precision": precision,
            "f1": f1}
