"""Threshold choice and decisions at a threshold."""

import numpy as np
import pytest

from cada.threshold import decision_metrics, threshold_at_fpr, threshold_f1


def test_threshold_at_fpr_flags_at_most_the_target_fraction():
    scores = np.arange(100, dtype=float)
    for fpr in (0.0, 0.01, 0.05, 0.5):
        threshold = threshold_at_fpr(scores, fpr)
        assert (scores >= threshold).sum() == int(fpr * 100)
    ties = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    assert (ties >= threshold_at_fpr(ties, 0.4)).sum() == 1  # cannot split a tie: flag fewer, not more


def test_threshold_at_fpr_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        threshold_at_fpr([], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_fpr([0.1, np.nan], 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        threshold_at_fpr([0.1], 1.5)


def test_decision_metrics_by_hand():
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    metrics = decision_metrics(scores, labels, 0.5)  # flags 0.6, 0.7, 0.9
    assert metrics == pytest.approx({"fpr": 1 / 3, "recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3})
    assert decision_metrics(scores, labels, 10.0)["precision"] is None  # nothing flagged


def test_f1_threshold_separates_perfectly_separable_scores():
    scores, labels = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])
    threshold = threshold_f1(scores, labels)
    assert decision_metrics(scores, labels, threshold)["f1"] == 1.0
