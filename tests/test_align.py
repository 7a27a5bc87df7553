"""Aligners on tiny made-up features, where each 'class' has its own known statistics."""

import dataclasses

import pytest
import torch

from cada.align import CADA, CADASigma, ClassAware, ClassifierAligner, NoAlign, create_aligner
from cada.align.base import Head
from cada.config import AlignTraining

CLASS_STATS = torch.tensor([[0.05, 0.30, 0.04], [0.20, 0.60, 0.08], [0.40, 1.00, 0.12]])  # mean, max, std
NAMES = ["bottle", "grid", "tile"]


def _data(n_per_class=32, channels=16, seed=0):
    """Three classes with distinct feature patterns and distinct (mean, max, std) image statistics."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(3, channels, 1, 1, generator=generator) * 2
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = torch.relu(prototypes[labels] + 0.3 * torch.randn(len(labels), channels, 4, 4, generator=generator))
    image_stats = CLASS_STATS[labels] + 0.01 * torch.randn(len(labels), 3, generator=generator)
    return features, image_stats, labels, [NAMES[i] for i in labels]


def _settings(**changes):
    return dataclasses.replace(AlignTraining(iters=800, batch_size=16, hidden=32, smooth_l1_alpha=0.1), **changes)


def _fit(aligner_class, **changes):
    torch.manual_seed(0)  # dropout draws from the global generator
    features, image_stats, labels, names = _data()
    settings = _settings(**changes)
    aligner = aligner_class(16, settings)
    losses = aligner.fit(features, image_stats, settings, torch.Generator().manual_seed(0), names, progress=False)
    return aligner, losses, features, labels, names


def test_cada_regressor_learns_per_class_statistics_without_labels():
    aligner, losses, features, labels, _ = _fit(CADA)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        u, gamma = aligner.stats(features)
    for c in range(3):
        assert u[labels == c].mean().item() == pytest.approx(CLASS_STATS[c, 0].item(), abs=0.05)
        assert gamma[labels == c].mean().item() == pytest.approx(CLASS_STATS[c, 1].item(), abs=0.08)


def test_cada_sigma_predicts_gamma_as_u_plus_three_sigma():
    aligner, _, features, labels, _ = _fit(CADASigma)
    with torch.no_grad():
        u, gamma = aligner.stats(features)
    for c in range(3):
        expected = CLASS_STATS[c, 0] + 3 * CLASS_STATS[c, 2]
        assert gamma[labels == c].mean().item() == pytest.approx(expected.item(), abs=0.08)


def test_class_aware_uses_per_class_mean_and_mean_of_maxima():
    aligner, losses, features, labels, names = _fit(ClassAware)
    assert losses == []  # nothing to train: a table per class
    features_, image_stats, _, _ = _data()
    for c, name in enumerate(NAMES):
        assert aligner.class_u[c].item() == pytest.approx(image_stats[labels == c, 0].mean().item())
        assert aligner.class_gamma[c].item() == pytest.approx(image_stats[labels == c, 1].mean().item())
    u, gamma = aligner.stats(features[:2], ["tile", "bottle"])
    assert u.tolist() == pytest.approx([aligner.class_u[2].item(), aligner.class_u[0].item()])


def test_class_aware_refuses_missing_or_unknown_class_names():
    aligner, _, features, _, _ = _fit(ClassAware)
    with pytest.raises(ValueError, match="needs the class name"):
        aligner.stats(features[:1])
    with pytest.raises(ValueError, match=r"\['screw'\] were not seen in training"):
        aligner.stats(features[:1], ["screw"])


def test_classifier_equals_class_aware_when_it_classifies_perfectly():
    class_aware, _, features, labels, names = _fit(ClassAware)
    classifier, losses, _, _, _ = _fit(ClassifierAligner)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert torch.equal(classifier.class_indices(features), labels)  # a perfect classifier here
        u_b, gamma_b = classifier.stats(features)
    u_a, gamma_a = class_aware.stats(features, names)
    assert torch.equal(u_a, u_b) and torch.equal(gamma_a, gamma_b)


def test_classifier_answers_for_a_class_never_seen_in_training():
    classifier, _, _, _, _ = _fit(ClassifierAligner)
    unseen = torch.relu(torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(9)) * 3)
    with torch.no_grad():
        u, gamma = classifier.stats(unseen)
    known_u = set(classifier.class_u.tolist())
    assert all(value in known_u for value in u.tolist())


def test_spread_stays_positive_when_gamma_is_predicted_below_u():
    _, image_stats, _, _ = _data()
    aligner = CADA(16, _settings())
    aligner.set_min_spread(image_stats)
    assert aligner.min_spread.item() == pytest.approx(0.1 * (image_stats[:, 1] - image_stats[:, 0]).median().item())
    u, gamma = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.2, 0.5, 0.9])
    spread = aligner.spread(u, gamma)
    assert (spread > 0).all()
    assert spread[0] == spread[1] == aligner.min_spread and spread[2] == pytest.approx(0.4)


@pytest.mark.parametrize("convs,linears", [(0, 1), (0, 2), (0, 3), (1, 2), (2, 2)])
def test_head_structures_of_table_3(convs, linears):
    head = Head(16, 2, hidden=32, dropout=0.5, convs=convs, linears=linears)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == convs
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == linears
    assert sum(isinstance(m, torch.nn.Dropout) for m in head.modules()) == linears  # before each linear layer
    assert head.eval()(torch.randn(3, 16, 4, 4)).shape == (3, 2)


def test_no_align_is_the_identity():
    aligner = create_aligner("none", 16, AlignTraining())
    assert isinstance(aligner, NoAlign)
    u, gamma = aligner.stats(torch.zeros(5, 16, 2, 2))
    assert u.tolist() == [0.0] * 5 and gamma.tolist() == [1.0] * 5


def test_unknown_aligner_is_refused():
    with pytest.raises(ValueError, match="unknown aligner"):
        create_aligner("magic", 16, AlignTraining())
