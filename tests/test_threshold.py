"""Threshold choice and decisions at a threshold."""

import numpy as np
import pytest

from cada.threshold import decision_metrics, threshold_at_fpr, threshold_f1, unresolved_fpr


def test_threshold_at_fpr_flags_the_conformal_count_of_calibration_images():
    scores = np.arange(100, dtype=float)
    # n = 100: floor(fpr x 101) - 1 of them may be flagged (not floor(fpr x 100))
    for fpr, flagged in ((0.0, 0), (0.01, 0), (0.02, 1), (0.05, 4), (0.5, 49)):
        assert (scores >= threshold_at_fpr(scores, fpr)).sum() == flagged
    for fpr, flagged in ((0.01, 1), (0.05, 5), (0.5, 50)):  # of these images themselves: floor(fpr x 100)
        assert (scores >= threshold_at_fpr(scores, fpr, new_images=False)).sum() == flagged
    ties = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    assert (ties >= threshold_at_fpr(ties, 0.4)).sum() == 1  # cannot split a tie: flag fewer, not more


def test_threshold_at_fpr_holds_the_target_on_new_normal_images():
    """Calibrated on n draws, the threshold flags a new draw of the same distribution with probability at most the
    target (averaged over calibration sets). The rule that flags floor(fpr n) calibration images instead breaks it in
    each of these cases (1.3%, 5.3% and 2.2% here), the threshold then sitting in the gap above the flagged ones."""
    rng = np.random.default_rng(0)
    for n, fpr in ((100, 0.01), (120, 0.05), (250, 0.02)):
        # exponential scores: a new one is flagged with probability exp(-threshold)
        rates = [np.exp(-threshold_at_fpr(rng.exponential(size=n), fpr)) for _ in range(4000)]
        assert np.mean(rates) <= fpr
        if fpr * (n + 1) >= 2:  # some calibration images are flagged: the threshold uses most of the budget
            assert np.mean(rates) >= 0.8 * fpr


def test_unresolved_fpr_says_when_no_threshold_can_hold_the_target():
    assert unresolved_fpr(99, 0.01) is None  # above all 99: a new image is the highest with probability 1/100
    message = unresolved_fpr(98, 0.01)
    assert message is not None and "1/99" in message and "at least 99 images" in message
    assert "at least 19 images" in unresolved_fpr(8, 0.05)
    assert unresolved_fpr(8, 0.0) is None  # no rate asked for: flag none of them


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
