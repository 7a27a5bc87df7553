"""cada.metrics against scikit-learn and a brute-force AUPRO (timing: benchmarks/pixel_metrics.py)."""

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

import cada.metrics
from cada.metrics import aupro, auroc, average_precision, binary_metrics, f1_max, pixel_metrics

SEEDS = [0, 1, 2, 3, 4]


def _check(scores, labels):
    ref_auc = skm.roc_auc_score(labels.ravel(), scores.ravel())
    ref_ap = skm.average_precision_score(labels.ravel(), scores.ravel())
    assert auroc(scores, labels) == pytest.approx(ref_auc, abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(ref_ap, abs=1e-12)
    both = binary_metrics(scores, labels)
    assert both["auroc"] == pytest.approx(ref_auc, abs=1e-12)
    assert both["ap"] == pytest.approx(ref_ap, abs=1e-12)


def _data(seed, n=2000, pos_frac=0.1):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < pos_frac
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 1.2 * labels
    return scores, labels


@pytest.mark.parametrize("seed", SEEDS)
def test_continuous(seed):
    _check(*_data(seed))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pos_frac", [0.01, 0.5, 0.97])
def test_class_balance(seed, pos_frac):
    _check(*_data(seed, n=500, pos_frac=pos_frac))


@pytest.mark.parametrize("seed", SEEDS)
def test_ties_rounded(seed):
    scores, labels = _data(seed)
    _check(np.round(scores, 1), labels)


@pytest.mark.parametrize("seed", SEEDS)
def test_ties_integer(seed):
    scores, labels = _data(seed)
    _check(np.floor(scores * 2).astype(np.int64), labels.astype(np.int64))


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_and_int_labels(seed):
    scores, labels = _data(seed)
    _check(scores.astype(np.float32), labels.astype(np.uint8))
    _check(np.round(scores, 1).astype(np.float32), labels.astype(np.int32))


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_input(seed):
    scores, labels = _data(seed)
    for dtype in (torch.float32, torch.float64):
        t = torch.tensor(scores, dtype=dtype, requires_grad=True)
        got = binary_metrics(t, torch.from_numpy(labels))
        ref = t.detach().numpy()
        assert got["auroc"] == pytest.approx(skm.roc_auc_score(labels, ref), abs=1e-12)
        assert got["ap"] == pytest.approx(skm.average_precision_score(labels, ref), abs=1e-12)
    bf = torch.tensor(scores).bfloat16()  # NumPy has no bfloat16: converted to float32
    ref = skm.roc_auc_score(labels, bf.float().numpy())
    assert auroc(bf, labels) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_2d_is_flattened(seed):
    scores, labels = _data(seed)
    scores2d, labels2d = scores.reshape(40, 50), labels.reshape(40, 50)
    _check(scores2d, labels2d)
    assert auroc(scores2d, labels2d) == auroc(scores, labels)
    # shapes only need the same number of elements
    assert auroc(scores2d, labels.reshape(50, 40)) == auroc(scores, labels)


def test_constant_scores():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    scores = np.full(labels.size, 0.3)
    assert auroc(scores, labels) == 0.5
    assert average_precision(scores, labels) == pytest.approx(2 / 8)
    _check(scores, labels)


def test_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.arange(5.0)
    assert auroc(scores, labels) == 1.0
    assert average_precision(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    _check(scores, labels)
    _check(-scores, labels)


def test_small_exact_values():
    # negatives 0.1, 0.4, 0.4; positives 0.4, 0.8.
    # U: 0.4 beats one negative and ties two (1 + 2/2), 0.8 beats all three -> 5 / (2 * 3)
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    # thresholds 0.8 (TP 1, FP 0) and 0.4 (TP 2, FP 2): 0.5 * 1 + 0.5 * 0.5
    assert average_precision(scores, labels) == pytest.approx(0.75)
    _check(scores, labels)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad):
    scores, labels = _data(0, n=20)
    scores[[3, 7]] = bad
    with pytest.raises(ValueError, match="2 non-finite"):
        auroc(scores, labels)
    with pytest.raises(ValueError, match="2 non-finite"):
        average_precision(torch.from_numpy(scores.astype(np.float32)), labels)


def test_no_positives_or_no_negatives():
    scores = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="auroc needs both .* got 0 anomalous out of 10"):
        auroc(scores, np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="average_precision needs both .* got 0 normal out of 10"):
        average_precision(scores, np.ones(10, dtype=bool))


def test_size_mismatch_and_empty():
    with pytest.raises(ValueError, match="10 elements .* 9"):
        auroc(np.zeros(10), np.zeros(9))
    with pytest.raises(ValueError, match="empty"):
        binary_metrics(np.zeros(0), np.zeros(0))


@pytest.mark.parametrize("labels", [[0, 1, 2, 0], [0, -1, 1, 0], [0.0, 0.5, 1.0, 0.0]])
def test_labels_not_binary(labels):
    with pytest.raises(ValueError, match="labels must be 0/1"):
        auroc(np.arange(4.0), np.array(labels))


# ---- F1-max -------------------------------------------------------------------------------------------


def _check_f1(scores, labels):
    """Against the maximum of 2PR/(P+R) over scikit-learn's precision_recall_curve (ascending thresholds)."""
    precision, recall, thresholds = skm.precision_recall_curve(labels.ravel(), scores.ravel())
    precision, recall = precision[:-1], recall[:-1]  # the last point (P=1, R=0) has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    # among (numerically) tied maxima, the lowest threshold
    assert threshold == thresholds[np.flatnonzero(f1 >= f1.max() - 1e-12)[0]]
    assert binary_metrics(scores, labels)["f1max"] == best


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pos_frac", [0.01, 0.1, 0.5, 0.97])
def test_f1_max_against_sklearn(seed, pos_frac):
    scores, labels = _data(seed, n=1000, pos_frac=pos_frac)
    _check_f1(scores, labels)
    _check_f1(np.round(scores, 1), labels)  # ties
    _check_f1(np.floor(scores * 2).astype(np.int64), labels.astype(np.uint8))
    _check_f1(scores.astype(np.float32).reshape(40, 25), labels.reshape(40, 25))


def test_f1_max_small_exact_values():
    # thresholds 0.8: TP 1, FP 0 -> F1 2/3; 0.4: TP 2, FP 2 -> 2/3 too (the lower wins); 0.1: 4/7
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    assert f1_max(scores, labels) == (pytest.approx(2 / 3), 0.4)
    _check_f1(scores, labels)


def test_f1_max_constant_and_perfect():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    # one threshold: everything predicted anomalous, P = 2/8, R = 1
    assert f1_max(np.full(8, 0.3), labels) == (pytest.approx(2 * 0.25 / 1.25), 0.3)
    _check_f1(np.full(8, 0.3), labels)
    scores = np.arange(8.0) + 10 * labels
    assert f1_max(scores, labels) == (1.0, 11.0)
    with pytest.raises(ValueError, match="f1_max needs both .* got 0 anomalous"):
        f1_max(scores, np.zeros(8))


# ---- AUPRO --------------------------------------------------------------------------------------------


def _components(mask):
    """8-connected components by flood fill: (labels 1..n, n). Independent of scipy on purpose."""
    labels, n = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], stack = n, [start]
        while stack:
            i, j = stack.pop()
            for a in range(max(i - 1, 0), min(i + 2, mask.shape[0])):
                for b in range(max(j - 1, 0), min(j + 2, mask.shape[1])):
                    if mask[a, b] and not labels[a, b]:
                        labels[a, b] = n
                        stack.append((a, b))
    return labels, n


def _brute_aupro(maps, masks, fpr_limit):
    """The definition, threshold by threshold: the PRO(FPR) curve from (0, 0) through every distinct score,
    trapezoids up to fpr_limit (the last one cut where the curve crosses it), divided by fpr_limit."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = _components(mask)
        regions += [(i, labels == k) for k in range(1, n + 1)]
    # Image by image, so that images of different sizes (a list) work too.
    n_normal = sum(np.count_nonzero(~mask) for mask in masks)
    fpr, pro = [0.0], [0.0]
    for t in np.unique(np.concatenate([np.ravel(m) for m in maps]))[::-1]:
        above = [m >= t for m in maps]
        fpr.append(sum(np.count_nonzero(a[~mask]) for a, mask in zip(above, masks)) / n_normal)
        pro.append(np.mean([above[i][region].mean() for i, region in regions]))
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr, pro, fpr[1:], pro[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # interpolate the curve at the limit
            x1, y1 = fpr_limit, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _pixel_data(seed, n=6, h=9, w=11):
    """Random masks (many small regions, diagonal contacts), a rectangle, and images without any region."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < 0.12
    masks[1, 2:6, 3:8] = True
    masks[::3] = False  # images 0, 3: no region
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    return maps, masks


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fpr_limit", [0.01, 0.05, 0.3, 1.0])
def test_aupro_against_brute_force(seed, fpr_limit):
    maps, masks = _pixel_data(seed)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(_brute_aupro(maps, masks, fpr_limit), abs=1e-12)
    ties = np.round(maps, 1)  # ties inside regions, and between normal and anomalous pixels
    assert aupro(ties, masks, fpr_limit) == pytest.approx(_brute_aupro(ties, masks, fpr_limit), abs=1e-12)
    coarse = np.floor(maps).astype(np.float32)  # a handful of distinct values
    assert aupro(coarse, masks, fpr_limit) == pytest.approx(_brute_aupro(coarse, masks, fpr_limit), abs=1e-7)


def test_aupro_hand_made_values():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # one region: diagonal neighbours are connected (8-connectivity)
    masks[1, 3, 3] = True
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = maps[1, 3, 3] = 1.0
    maps[0, 1, 1] = -1.0  # below every normal pixel: half of the first region is never found before FPR = 1
    # PRO = (1/2 + 1) / 2 at every FPR < 1 (with 4-connectivity it would be (1 + 0 + 1) / 3)
    assert aupro(maps, masks) == pytest.approx(0.75)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(_brute_aupro(maps, masks, 1.0))
    assert aupro(np.where(masks, 1.0, 0.0), masks) == 1.0  # perfect
    assert aupro(np.where(masks, 0.0, 1.0), masks) == 0.0  # inverted
    # constant scores: one threshold, the curve is the diagonal PRO = FPR, so the area is limit^2 / 2
    assert aupro(np.full(masks.shape, 0.5), masks, 0.3) == pytest.approx(0.15)


def test_aupro_is_auroc_when_every_pixel_weighs_the_same():
    # Regions of one pixel each, apart from one another: uniform PRO weights, and up to FPR 1 the area is AUROC.
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 12, 12), bool)
    masks[:, ::3, ::3] = rng.random((5, 4, 4)) < 0.5
    maps = np.round(rng.normal(size=masks.shape) + masks, 1)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(auroc(maps, masks), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_against_references(seed):
    maps, masks = _pixel_data(seed)
    maps = np.round(maps, 1).astype(np.float32)
    got = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["ap"] == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert (got["f1max"], got["f1max_threshold"]) == f1_max(maps, masks)
    _check_f1(maps, masks)
    assert got["aupro"] == pytest.approx(_brute_aupro(maps, masks, 0.3), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_on_images_of_different_sizes(seed):
    """Original-resolution evaluation: a list of maps and masks of different sizes, read one image at a time."""
    rng = np.random.default_rng(seed)
    shapes = [(9, 11), (5, 7), (12, 4), (8, 8), (3, 13)]
    masks = [rng.random(shape) < 0.15 for shape in shapes]
    masks[1][:] = False  # an image without any region
    maps = [np.round(rng.normal(size=m.shape) + 1.5 * m, 1).astype(np.float32) for m in masks]
    got = pixel_metrics(maps, masks)
    flat_maps, flat_masks = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert got["ap"] == pytest.approx(skm.average_precision_score(flat_masks, flat_maps), abs=1e-12)
    assert (got["f1max"], got["f1max_threshold"]) == f1_max(flat_maps, flat_masks)
    assert got["aupro"] == pytest.approx(_brute_aupro(maps, masks, 0.3), abs=1e-12)
    # images of one size give the same as the N x H x W array
    same_maps, same_masks = _pixel_data(seed)
    assert pixel_metrics(list(same_maps), list(same_masks)) == pixel_metrics(same_maps, same_masks)
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(maps, masks[::-1])
    with pytest.raises(ValueError, match="4 maps but 5 masks"):
        pixel_metrics(maps[:4], masks)
    with pytest.raises(ValueError, match="both as"):
        pixel_metrics(same_maps, list(same_masks))


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_the_same_read_in_small_chunks(seed, monkeypatch):
    # Regions are labelled chunk by chunk: region ids must stay distinct across chunks.
    maps, masks = _pixel_data(seed, n=7)
    whole = pixel_metrics(maps, masks)
    monkeypatch.setattr(cada.metrics, "_CHUNK", 2 * maps[0].size)  # two images per chunk
    assert pixel_metrics(maps, masks) == whole
    monkeypatch.setattr(cada.metrics, "_CHUNK", 1)
    assert pixel_metrics(maps, masks) == whole
    assert whole["aupro"] == pytest.approx(_brute_aupro(maps, masks, 0.3), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("block", [1, 2, 7])
def test_positives_walked_in_small_blocks(seed, block, monkeypatch):
    # Blocks must not split a run of equal positive scores (the coarse scores have long runs).
    maps, masks = _pixel_data(seed)
    for scores in (maps, np.round(maps, 1), np.floor(maps)):
        whole = pixel_metrics(scores, masks)
        with monkeypatch.context() as patch:
            patch.setattr(cada.metrics, "_BLOCK", block)
            blocked = pixel_metrics(scores, masks)
        assert blocked == pytest.approx(whole, abs=1e-12)
        assert blocked["f1max_threshold"] == whole["f1max_threshold"]


def test_pixel_metrics_reads_lazy_maps():
    class Doubled:  # only .shape and slicing, as evaluate's aligned view
        shape = (6, 9, 11)

        def __getitem__(self, rows):
            return 2 * maps[rows]

    maps, masks = _pixel_data(0)
    assert pixel_metrics(Doubled(), masks.astype(np.uint8)) == pixel_metrics(maps, masks) | {
        "f1max_threshold": 2 * pixel_metrics(maps, masks)["f1max_threshold"]
    }


def test_pixel_metrics_degenerate_inputs():
    maps = np.random.default_rng(0).random((3, 5, 5))
    with pytest.raises(ValueError, match="aupro needs both normal and anomalous pixels; got 0 anomalous out of 75"):
        aupro(maps, np.zeros(maps.shape, bool))
    with pytest.raises(ValueError, match="pixel_metrics needs both .* got 0 normal out of 75"):
        pixel_metrics(maps, np.ones(maps.shape, bool))
    masks = maps > 0.8
    with pytest.raises(ValueError, match="N x H x W"):
        aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match=r"\(3, 5, 5\) and \(3, 5, 4\)"):
        pixel_metrics(maps, masks[..., :4])
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        aupro(maps, masks, fpr_limit=1.5)
    maps[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        pixel_metrics(maps, masks)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        pixel_metrics(maps, masks * 2)


def test_pooled_auroc_ceiling_interleaves_the_groups_at_their_best():
    """Worked by hand: each group keeps its own ranking; only pairs of different groups can be put right."""
    from cada.metrics import pooled_auroc_ceiling

    # One group: nothing to interleave, its own AUROC (normals 0, 1, 2, anomalies 1.5, 3: 5/6), although its ROC
    # hull (through (0, 0.5) and (1/3, 1)) encloses 11/12.
    single = [0, 1, 2, 1.5, 3]
    assert pooled_auroc_ceiling(single, [0, 0, 0, 1, 1], [0] * 5) == pytest.approx(auroc(single, [0, 0, 0, 1, 1]))
    # Two groups, each separated perfectly but on scales that overlap when pooled: the best interleaving is perfect.
    assert auroc([0, 1, 10, 11], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert pooled_auroc_ceiling([0, 1, 10, 11], [0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    # A group of anomalies only goes on top: it beats both normals of the other group, whose anomaly (0.5) beats
    # one of its two normals: 3 of 4 pairs.
    assert pooled_auroc_ceiling([0, 1, 0.5, -5], [0, 0, 1, 1], ["a", "a", "a", "b"]) == pytest.approx(0.75)
    assert pooled_auroc_ceiling([0, 1, 2], [0, 0, 0], [0, 0, 1]) is None


def test_pooled_auroc_ceiling_is_the_best_interleaving():
    """Against brute force: every interleaving of three small groups, each in its own order."""
    from itertools import combinations

    from cada.metrics import pooled_auroc_ceiling

    def interleavings(sizes):  # which group each position takes, for every way of interleaving the groups
        first, second = sizes[0], sizes[1]
        for mine in combinations(range(sum(sizes)), first):
            rest = [i for i in range(sum(sizes)) if i not in mine]
            for theirs in combinations(rest, second):
                order = [2] * sum(sizes)
                for i in mine:
                    order[i] = 0
                for i in theirs:
                    order[i] = 1
                yield order

    rng = np.random.default_rng(0)
    for _ in range(8):
        sizes = (4, 4, 3)
        groups = np.repeat(np.arange(3), sizes)
        labels = np.concatenate([rng.permutation([0, 1] * 2)[:n] for n in sizes])
        labels[[0, 4]] = (0, 1)  # both kinds somewhere
        scores = rng.normal(size=len(labels))
        ranked = [[labels[i] for i in np.flatnonzero(groups == g)[np.argsort(-scores[groups == g])]] for g in range(3)]
        best = 0.0
        for order in interleavings(sizes):
            taken, sequence = [0, 0, 0], []
            for g in order:  # one interleaving, highest score first
                sequence.append(ranked[g][taken[g]])
                taken[g] += 1
            normals_below = np.cumsum(np.array(sequence[::-1]) == 0)[::-1]
            right = sum(below for label, below in zip(sequence, normals_below) if label == 1)
            best = max(best, right / ((labels == 0).sum() * (labels == 1).sum()))
        assert pooled_auroc_ceiling(scores, labels, groups) == pytest.approx(best)


def test_pooled_auroc_ceiling_bounds_every_per_group_rescaling():
    """Any per-group monotone rescaling keeps the ceiling, and no rescaling's pooled AUROC exceeds it."""
    from cada.metrics import pooled_auroc_ceiling

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 40)
    labels = rng.random(120) < 0.4
    scores = rng.normal(size=120) + labels * np.array([0.5, 1.5, 3.0])[groups] + np.array([0, 4, -3])[groups]
    ceiling = pooled_auroc_ceiling(scores, labels, groups)
    assert auroc(scores, labels) < ceiling <= 1
    best = 0.0
    for _ in range(200):
        scale, shift = rng.uniform(0.2, 5, 3), rng.normal(scale=4, size=3)
        rescaled = np.exp(scores * 0.3) * scale[groups] + shift[groups]  # increasing within every group
        assert pooled_auroc_ceiling(rescaled, labels, groups) == pytest.approx(ceiling)
        best = max(best, auroc(rescaled, labels))
    assert best <= ceiling
