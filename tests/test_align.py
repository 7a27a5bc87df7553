"""Aligners on tiny made-up features, where each 'class' has its own known statistics."""

import pytest
import torch

from cada.align import CADA, NoAlign, create_aligner
from cada.config import AlignTraining


def _features_and_targets(n_per_class=32, channels=16, seed=0):
    """Three classes with distinct feature patterns and distinct (mean, max) targets."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(3, channels, 1, 1, generator=generator) * 2
    stats = torch.tensor([[0.05, 0.30], [0.20, 0.60], [0.40, 1.00]])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = torch.relu(prototypes[labels] + 0.3 * torch.randn(len(labels), channels, 4, 4, generator=generator))
    targets = stats[labels] + 0.01 * torch.randn(len(labels), 2, generator=generator)
    return features, targets, labels, stats


def test_cada_regressor_learns_per_class_statistics_without_labels():
    torch.manual_seed(0)  # dropout draws from the global generator
    features, targets, labels, stats = _features_and_targets()
    aligner = CADA(16, hidden=32, dropout=0.25)
    settings = AlignTraining(iters=800, batch_size=16, smooth_l1_alpha=0.1)
    losses = aligner.fit(features, targets, settings, torch.Generator().manual_seed(0), progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        u, gamma = aligner.stats(features)
    for c in range(3):
        assert u[labels == c].mean().item() == pytest.approx(stats[c, 0].item(), abs=0.05)
        assert gamma[labels == c].mean().item() == pytest.approx(stats[c, 1].item(), abs=0.08)


def test_spread_stays_positive_when_gamma_is_predicted_below_u():
    features, targets, _, _ = _features_and_targets()
    aligner = CADA(16)
    aligner.set_min_spread(targets)
    assert aligner.min_spread.item() == pytest.approx(0.1 * (targets[:, 1] - targets[:, 0]).median().item())
    u, gamma = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.2, 0.5, 0.9])
    spread = aligner.spread(u, gamma)
    assert (spread > 0).all()
    assert spread[0] == spread[1] == aligner.min_spread and spread[2] == pytest.approx(0.4)


def test_no_align_is_the_identity():
    aligner = create_aligner("none", 16, AlignTraining())
    assert isinstance(aligner, NoAlign)
    u, gamma = aligner.stats(torch.zeros(5, 16, 2, 2))
    assert u.tolist() == [0.0] * 5 and gamma.tolist() == [1.0] * 5


def test_unknown_aligner_is_refused():
    with pytest.raises(ValueError, match="unknown aligner"):
        create_aligner("magic", 16, AlignTraining())
