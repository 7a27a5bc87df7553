"""Aligners on tiny made-up features, where each 'class' has its own known statistics."""

import dataclasses

import pytest
import torch

from cada.align import (
    CADA,
    SCORE,
    CADAScore,
    CADASigma,
    ClassAware,
    ClassifierAligner,
    KNNAligner,
    KNNDistance,
    NoAlign,
    create_aligner,
)
from cada.align.base import Head
from cada.config import AlignTraining
from cada.lookalike import UNFAMILIAR_MARGIN, ZSCORE_WIDTH, map_statistics
from cada.scoring import align, aligned_scores

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
    for c in range(len(NAMES)):
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


def _products(n_per_product, seed, prototypes_seed=1, n_products=3, channels=16):
    """Products with their own feature pattern and their own normal image-score level and spread."""
    prototypes = torch.randn(n_products, channels, 1, 1, generator=torch.Generator().manual_seed(prototypes_seed)) * 2
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_products).repeat_interleave(n_per_product)
    features = torch.relu(prototypes[labels] + 0.3 * torch.randn(len(labels), channels, 4, 4, generator=generator))
    level, spread = torch.tensor([0.2, 0.5, 1.5, 3.0])[labels], torch.tensor([0.02, 0.05, 0.3, 0.1])[labels]
    scores = level + spread * torch.randn(len(labels), generator=generator)
    image_stats = torch.stack([0.5 * level, 2 * level, spread, scores], dim=1)  # mean, max, std, score
    return features, image_stats, labels


def _knn(features, image_stats, neighbours=10, name="knn", **changes):
    settings = _settings(neighbours=neighbours, **changes)
    aligner = create_aligner(name, features.shape[1], settings)
    assert isinstance(aligner, KNNAligner)
    aligner.fit(features, image_stats, settings, torch.Generator().manual_seed(0), progress=False)
    return aligner


def test_knn_aligns_every_product_to_one_normal_level_without_labels():
    features, image_stats, labels = _products(40, seed=0)
    aligner = _knn(features, image_stats)
    test_features, test_stats, test_labels = _products(40, seed=1)  # new normal images of the same products
    with torch.no_grad():
        u, gamma = aligner.stats(test_features)
        aligned = align(test_stats[:, SCORE], u, aligner.spread(u, gamma))
    raw_medians = [test_stats[test_labels == c, SCORE].median().item() for c in range(3)]
    medians = [aligned[test_labels == c].median().item() for c in range(3)]
    assert max(raw_medians) / min(raw_medians) > 5  # very different products before alignment
    assert medians == pytest.approx([1.0] * 3, abs=0.15)  # 1 = the typical normal image, whatever the product
    # One z-score scale: the spread of aligned normal scores is about 1 / ZSCORE_WIDTH in every product.
    assert [aligned[test_labels == c].std().item() for c in range(3)] == pytest.approx([1 / ZSCORE_WIDTH] * 3, rel=0.4)


def test_knn_nearest_distance_flags_a_product_left_out_of_training():
    features, image_stats, labels = _products(40, seed=0)
    trained = labels < 2  # product 2 is left out of training
    aligner = _knn(features[trained], image_stats[trained])
    test_features, _, test_labels = _products(40, seed=1)
    with torch.no_grad():
        distance = aligner.nearest_distance(test_features)
    held_out, unseen = distance[test_labels < 2], distance[test_labels == 2]
    assert unseen.min() > held_out.max()
    assert (unseen > aligner.unfamiliar_reference).all()
    assert (held_out > aligner.reference_distance).float().mean() <= 0.1  # about 1% by construction; few here
    assert NoAlign().nearest_distance(test_features) is None  # aligners without a descriptor report nothing


def test_knn_aligns_a_product_with_fewer_training_images_than_neighbours_by_its_own():
    """Product 2 has 6 training images and k = 10: its new images take their normal mean from those 6 alone, not
    from the 4 nearest images of other products (beyond the unfamiliar level, at other score levels); those 4 count
    in the spread at the typical spread of the training images' neighbourhoods."""
    features, image_stats, labels = _products(40, seed=0)
    few = (labels < 2) | (torch.arange(len(labels)) % 40 < 6)
    aligner = _knn(features[few], image_stats[few], neighbours=10)
    own = image_stats[few][labels[few] == 2, SCORE]
    test_features, _, test_labels = _products(40, seed=1)
    with torch.no_grad():
        u, gamma = aligner.stats(test_features[test_labels == 2])
    assert torch.allclose(gamma, own.mean().expand_as(gamma))  # gamma = the normal mean
    std = ((6 * own.var() + 4 * aligner.typical_std**2) / 10).sqrt()
    assert torch.allclose((gamma - u) / ZSCORE_WIDTH, std.expand_as(u))


def test_knn_keeps_a_neighbourhood_for_an_image_far_from_every_training_image():
    """Beyond the unfamiliar level every neighbour is far; those within FAR_NEIGHBOURHOOD x the nearest still count
    (not just the nearest two), and near an image only those within the level."""
    features, image_stats, _ = _products(40, seed=0)
    aligner = _knn(features, image_stats)
    level = aligner.unfamiliar_reference
    distances = torch.tensor([[0.1, 0.5, 0.9, 1.1, 2.1], [3.0, 3.5, 4.4, 4.6, 9.0]]) * level
    keep = aligner.same_product(distances)
    assert keep.tolist() == [[True, True, True, False, False], [True, True, True, False, False]]


def test_knn_does_not_call_anomalies_of_a_trained_product_unfamiliar():
    """An anomaly of a trained product (here a change at one of 16 positions) often lies beyond the training set's
    99th-percentile nearest distance, as real ones do (docs/results/aligners.md); the flag's margin keeps it
    familiar."""
    features, image_stats, labels = _products(40, seed=0)
    aligner = _knn(features, image_stats)
    anomalous, _, _ = _products(40, seed=1)
    anomalous[:, :, 1, 2] += 2 * torch.rand(anomalous.shape[:2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        distance = aligner.nearest_distance(anomalous)
    assert (distance > aligner.reference_distance).float().mean() > 0.5
    assert (distance <= aligner.unfamiliar_reference).all()
    assert aligner.unfamiliar_reference == UNFAMILIAR_MARGIN * float(aligner.reference_distance)


def test_knn_state_round_trips_through_config_and_tensors():
    features, image_stats, _ = _products(20, seed=0)
    aligner = _knn(features, image_stats, neighbours=5)
    fresh = create_aligner("knn", 16, _settings())
    fresh.load_config_state(aligner.config_state())
    fresh.load_state_dict(aligner.state_dict(), strict=True)
    assert fresh.neighbours == 5
    for a, b in zip(aligner.stats(features), fresh.stats(features)):
        assert torch.equal(a, b)


def _aligned(aligner, features, stats):
    """Aligned image scores, with the aligner's score offset (as cada.inference adds it)."""
    with torch.no_grad():
        u, gamma = aligner.stats(features)
        return aligned_scores(stats[:, SCORE], u, aligner.spread(u, gamma), aligner.score_offset(features))


def test_knn_distance_adds_how_unlike_its_neighbours_an_image_is_to_the_score_only():
    features, image_stats, _ = _products(40, seed=0)
    plain = _knn(features, image_stats)
    with_distance = _knn(features, image_stats, name="knn-distance", distance_weight=0.5)
    assert isinstance(with_distance, KNNDistance) and with_distance.has_score_offset and not plain.has_score_offset
    test_features, test_stats, test_labels = _products(40, seed=1)
    # New normal images are as far from their nearest training image as training images are from theirs: the
    # offset leaves them at the normal level of every product.
    aligned = _aligned(with_distance, test_features, test_stats)
    assert [aligned[test_labels == c].median().item() for c in range(3)] == pytest.approx([1.0] * 3, abs=0.15)
    # The same images changed as a whole (every feature scaled), their own map scores unchanged: knn aligns them
    # by their neighbours as before, knn-distance scores them higher, by more the farther they moved.
    changed = [test_features * factor for factor in (1.5, 2.0)]
    gains = [(_aligned(with_distance, f, test_stats) - _aligned(plain, f, test_stats)).median() for f in changed]
    assert 0 < gains[0] < gains[1]
    # The maps are knn's: (u, gamma) are the same, only the image score moves.
    for a, b in zip(with_distance.stats(changed[1]), plain.stats(changed[1])):
        assert torch.equal(a, b)
    # With weight 0 it is knn exactly.
    unweighted = _knn(features, image_stats, name="knn-distance", distance_weight=0.0)
    assert torch.equal(_aligned(unweighted, test_features, test_stats), _aligned(plain, test_features, test_stats))


def test_distance_only_keeps_the_map_and_adds_knn_distances_term_and_unfamiliar_signal():
    features, image_stats, labels = _products(40, seed=0)
    trained = labels < 2
    distance = _knn(features[trained], image_stats[trained], name="knn-distance")
    only = _knn(features[trained], image_stats[trained], name="distance-only")
    test_features, test_stats, _ = _products(40, seed=1)
    with torch.no_grad():
        u, gamma = only.stats(test_features)
        assert torch.equal(align(test_stats[:, SCORE], u, only.spread(u, gamma)), test_stats[:, SCORE])
        assert torch.equal(only.score_offset(test_features), distance.score_offset(test_features))
        assert torch.equal(only.nearest_distance(test_features), distance.nearest_distance(test_features))
    assert only.unfamiliar_reference == distance.unfamiliar_reference


def test_knn_distance_state_round_trips_through_config_and_tensors():
    features, image_stats, _ = _products(20, seed=0)
    aligner = _knn(features, image_stats, neighbours=5, name="knn-distance", distance_weight=0.7)
    fresh = create_aligner("knn-distance", 16, _settings())
    fresh.load_config_state(aligner.config_state())
    fresh.load_state_dict(aligner.state_dict(), strict=True)
    assert (fresh.neighbours, fresh.distance_weight) == (5, 0.7)
    for a, b in zip(aligner.stats(features), fresh.stats(features)):
        assert torch.equal(a, b)
    assert torch.equal(aligner.score_offset(features), fresh.score_offset(features))


def test_image_score_targets_put_normals_at_one_level_whatever_the_spikiness():
    """Products whose normal maps share mean and image score but differ in spikiness (their max): aligned with the
    max (the paper's CADA target) the normals of each product sit at their own level; with the image score, at 1."""
    generator = torch.Generator().manual_seed(0)
    size, n = 32, 48
    maps = 0.1 + 0.01 * torch.rand(2 * n, size, size, generator=generator)
    maps[:, 10:22, 10:22] += 0.2  # both products: a broad plateau of 144 pixels
    rows, columns = torch.randint(10, 22, (2, n, 3), generator=generator)
    maps[torch.arange(n, 2 * n)[:, None], rows, columns] += 2.0  # the spiky one: also 3 hot pixels in it
    stats = map_statistics(maps, smoothing_sigma=0.0, top_fraction=0.1)
    labels = torch.arange(2).repeat_interleave(n)
    prototypes = torch.randn(2, 16, 1, 1, generator=generator) * 2
    features = torch.relu(prototypes[labels] + 0.3 * torch.randn(2 * n, 16, 4, 4, generator=generator))
    medians = {}
    for aligner_class in (CADA, CADAScore):
        torch.manual_seed(0)
        settings = _settings(iters=400)
        aligner = aligner_class(16, settings)
        aligner.fit(features, stats, settings, torch.Generator().manual_seed(0), progress=False)
        aligner.eval()
        with torch.no_grad():
            u, gamma = aligner.stats(features)
            aligned = align(stats[:, SCORE], u, aligner.spread(u, gamma))
        medians[aligner.name] = [aligned[labels == c].median().item() for c in range(2)]
    assert abs(medians["cada"][0] - medians["cada"][1]) > 0.3  # the max puts the two products apart
    assert medians["cada-score"] == pytest.approx([1.0, 1.0], abs=0.1)


def test_knn_needs_two_neighbours_to_estimate_a_spread():
    from cada.config import Settings

    with pytest.raises(ValueError, match=r"aligner.neighbours must be an integer in \[2,"):
        Settings(aligner=AlignTraining(neighbours=1)).validate()
