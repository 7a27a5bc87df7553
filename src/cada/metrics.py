"""Exact, memory-lean anomaly-detection metrics: AUROC, AP, F1-max (image and pixel level) and AUPRO.

AUROC, AP and F1-max equal scikit-learn's ``roc_auc_score``, ``average_precision_score`` and the maximum
of 2PR/(P+R) over ``precision_recall_curve`` (ties included: all samples with the same score form one
threshold, and a sample is predicted anomalous when its score >= the threshold). AUPRO is the MVTec AD
definition, exact at every distinct threshold (no fixed grid, no downsampling).

Algorithm: one pass over the scores, a chunk of images at a time, routes them to positives and negatives.
The negatives (~97% of the pixels) go straight into one preallocated array that is sorted in place: the
only full-size copy. The positives are few and sorted (ties ordered by their per-pixel AUPRO weight, so the
order, and every floating-point sum over it, does not depend on where the pixels came from).
Then, for each *distinct* positive value v (multiplicity m), binary searches in the sorted negatives give
#neg < v and #neg <= v (the second only where a negative equals v), and every metric follows in
O(distinct positives * log n_neg). Those two counts are all the metrics read of the negatives, so they can
also be summed over pieces held by several processes (`distributed_pixel_metrics`):

* AUROC (Mann-Whitney U): every positive at v beats the negatives strictly below v and ties with the
  ones equal to v, so U = sum m * (#neg < v + #neg == v / 2) and AUROC = U / (n_pos * n_neg).
* AP = sum over thresholds of (R_n - R_{n-1}) * P_n. Recall only moves at thresholds where positives
  lie, by m / n_pos, and there the precision is TP / (TP + FP) with TP = #pos >= v, FP = #neg >= v.
* F1 = 2PR / (P + R) = 2 TP / (TP + FP + n_pos). Lowering the threshold onto a value with only
  negatives adds false positives and no true positive, so the maximum lies at a positive value.
* AUPRO: PRO(t) = mean over ground-truth regions of the fraction of the region with score >= t, i.e.
  the sum of w = 1 / (n_regions * region_size) over anomalous pixels scoring >= t. The area under
  PRO(FPR) is then a sum over positives: one at v adds w over the FPR range where the threshold is
  <= v, a linear ramp across the tie segment [#neg > v, #neg >= v] / n_neg (the trapezoid rule), then
  flat; clipping that at the FPR limit gives the linear interpolation of the curve at the limit.

Cost at MVTec AD size (1,725 maps of 256x256, 113M pixels, 2.7% anomalous; benchmarks/pixel_metrics.py,
2 busy cores): all four pixel metrics in 4-8 s and +0.55 GiB over the data (0.42 GiB of it the sorted
normal scores), where scikit-learn's roc_auc_score + average_precision_score take 150-210 s and +5.5 GiB.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "HEADERS",
    "METRICS",
    "METRIC_HEADERS",
    "auroc",
    "average_precision",
    "f1_max",
    "aupro",
    "binary_metrics",
    "distributed_pixel_metrics",
    "pixel_metrics",
    "pooled_auroc_ceiling",
]

# The one table of a results row's metrics: JSON key -> column header. The JSON of `cada evaluate`, its text
# tables, the HTML report and the ablation tables all read it.
METRIC_HEADERS = {
    "i_auroc": "I-AUROC",
    "i_ap": "I-AP",
    "i_f1max": "I-F1max",
    "p_auroc": "P-AUROC",
    "p_ap": "P-AP",
    "p_f1max": "P-F1max",
    "aupro": "AUPRO",
}
METRICS = tuple(METRIC_HEADERS)
HEADERS = tuple(METRIC_HEADERS.values())

_CHUNK = 1 << 22  # elements read at a time, so per-chunk temporaries stay at a few tens of MB
_BLOCK = 1 << 18  # sorted positives walked at a time, for the same reason
# 8-connectivity within each image and none across images (MVTec AD's reference labels with a 3x3 of ones).
_REGION_STRUCTURE = np.zeros((3, 3, 3), bool)
_REGION_STRUCTURE[1] = True


def _as_array(x) -> np.ndarray:
    """NumPy view of an array-like or torch tensor (torch is not imported here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_bool(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.dtype == bool:
        return labels
    n_bad = np.count_nonzero((labels != 0) & (labels != 1))
    if n_bad:
        raise ValueError(f"{name}: labels must be 0/1 or bool; got {n_bad} other values")
    return labels == 1


def _pieces(scores, labels, name: str, regions: bool = False):
    """One pass over the rows, a chunk at a time: (positive scores in row order, the size of the region of
    each positive or None, negative scores sorted, number of regions, number of NaN, number of inf).
    Either kind may be empty (a shard of a data set in distributed evaluation). Scores and labels only need
    `.shape` and slicing, so they can be lazy views that make their rows when read. Without `.shape` they
    are sequences of per-image arrays, each of its own size, read one image at a time."""
    if hasattr(labels, "shape"):
        n_rows = labels.shape[0] if len(labels.shape) else 0
        step = max(1, _CHUNK // max(1, int(np.prod(labels.shape[1:]))))
        read = lambda x, c: _as_array(x[c])  # noqa: E731
    else:
        n_rows, step = len(labels), 1
        read = lambda x, c: _as_array(x[c.start])[None]  # noqa: E731
    chunks = [slice(i, i + step) for i in range(0, n_rows, step)]
    read_labels = lambda c: _as_bool(read(labels, c), name)  # noqa: E731
    n_pos = size = 0
    for c in chunks:  # a first, cheap pass: the size of the one copy
        y = read_labels(c)
        n_pos, size = n_pos + np.count_nonzero(y), size + y.size
    neg = None
    pieces: list[np.ndarray] = []  # the positives of each chunk
    region_pieces: list[np.ndarray] = []
    filled = n_regions = n_nan = n_inf = 0
    for c in chunks:
        y, s = read_labels(c), read(scores, c)
        if s.shape != y.shape:
            raise ValueError(f"{name}: scores rows {c.start}:{c.stop} have shape {s.shape}, labels {y.shape}")
        n_nan += np.count_nonzero(np.isnan(s))
        n_inf += np.count_nonzero(np.isinf(s))
        if neg is None:
            neg = np.empty(size - n_pos, s.dtype)
        pieces.append(s[y])
        part = s[~y]
        neg[filled : filled + part.size] = part
        filled += part.size
        if regions:
            components, count = ndimage.label(y, _REGION_STRUCTURE)
            region_pieces.append(components[y] + (n_regions - 1))  # ids 0..n_regions-1 over all images
            n_regions += count
    if neg is None:
        neg = np.empty(0, np.float32)
    pos = np.concatenate(pieces) if pieces else np.empty(0, neg.dtype)
    neg.sort()  # in place: the one sorted full-size copy
    region_size = None
    if regions:
        region_ids = np.concatenate(region_pieces) if region_pieces else np.empty(0, np.int64)
        region_size = np.bincount(region_ids, minlength=n_regions)[region_ids]
    return pos, region_size, neg, n_regions, n_nan, n_inf


def _check_pieces(name: str, unit: str, n_pos: int, n_neg: int, n_nan: int, n_inf: int) -> None:
    if n_pos + n_neg == 0:
        raise ValueError(f"{name}: got empty scores and labels")
    if n_pos == 0 or n_neg == 0:
        missing = "anomalous" if n_pos == 0 else "normal"
        raise ValueError(f"{name} needs both normal and anomalous {unit}; got 0 {missing} out of {n_pos + n_neg}")
    if n_nan or n_inf:
        raise ValueError(f"{name}: scores contain {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} inf)")


def _sort_positives(pos: np.ndarray, region_size, n_regions: int):
    """(sorted positives, AUPRO weight of each or None). With regions, ties are ordered by weight, so the
    order is canonical: positives gathered in any order (e.g. from several processes) sort identically and
    every floating-point sum over them comes out the same."""
    if region_size is None:
        return np.sort(pos), None
    weight = 1.0 / (n_regions * region_size)
    order = np.lexsort((weight, pos))
    return pos[order], weight[order]


def _split(scores, labels, name: str, unit: str, regions: bool = False):
    """Validate and split: (sorted positive scores, sorted negative scores, AUPRO weight of each sorted
    positive or None)."""
    pos, region_size, neg, n_regions, n_nan, n_inf = _pieces(scores, labels, name, regions)
    _check_pieces(name, unit, pos.size, neg.size, n_nan, n_inf)
    pos, weight = _sort_positives(pos, region_size, n_regions)
    return pos, neg, weight


def negative_counts(neg: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#neg < v, #neg <= v) for each v of `values`, `neg` sorted."""
    n_neg = neg.size
    below = np.searchsorted(neg, values, "left")
    if n_neg == 0:
        return below, below.copy()
    # #neg <= v: only values that some negative ties need the second search
    at_or_below = below.copy()
    tied = np.flatnonzero(neg[np.minimum(below, n_neg - 1)] == values)
    at_or_below[tied] = np.searchsorted(neg, values[tied], "right")
    return below, at_or_below


def _from_sorted(pos: np.ndarray, neg: np.ndarray, pro_weight=None, fpr_limit: float = 0.3) -> dict:
    """All metrics from sorted positive and negative scores (see module docstring)."""
    return _from_counts(pos, neg.size, lambda values: negative_counts(neg, values), pro_weight, fpr_limit)


def _from_counts(pos: np.ndarray, n_neg: int, counts, pro_weight=None, fpr_limit: float = 0.3) -> dict:
    """All metrics from sorted positives and `counts(values) -> (#neg < v, #neg <= v)` for ascending values.

    The positives are walked in blocks that never split a run of equal values, so the per-value
    temporaries stay at a few tens of MB however many anomalous pixels there are.
    """
    n_pos = pos.size
    limit = fpr_limit * n_neg  # the FPR limit in negative counts
    u2, ap, pro_area, best_f1, best_threshold = 0, 0.0, 0.0, -1.0, None
    cuts = np.unique(np.searchsorted(pos, pos[_BLOCK::_BLOCK], "left"))  # block starts at run starts
    bounds = [0, *cuts[cuts > 0], n_pos]
    for lo, hi in zip(bounds, bounds[1:]):
        block = pos[lo:hi]
        first = np.flatnonzero(np.concatenate(([True], block[1:] != block[:-1])))  # run starts in the block
        values, mult = block[first], np.diff(first, append=block.size)
        neg_below, neg_at_or_below = counts(values)
        # 2U in exact int64 arithmetic; Python int division rounds correctly at the end.
        u2 += int(np.dot(mult, neg_below + neg_at_or_below))
        tp = n_pos - lo - first  # positives >= v
        fp = n_neg - neg_below  # negatives >= v
        ap += float(np.dot(mult, tp / (tp + fp)))
        f1 = 2 * tp / (tp + fp + n_pos)
        i = int(np.argmax(f1))  # the first maximum: the lowest threshold that attains it
        if f1[i] > best_f1:  # blocks go up in score: a tie in a later block is a higher threshold
            best_f1, best_threshold = float(f1[i]), values[i].item()
        if pro_weight is not None:
            # The ramp of a positive at v runs from #neg > v to #neg >= v, then PRO stays up to the limit.
            start, end = (n_neg - neg_at_or_below).astype(float), fp.astype(float)
            reached = np.clip(limit, start, end)
            ramp = np.divide((reached - start) ** 2, 2 * (end - start), out=np.zeros_like(start), where=end > start)
            area = ramp + np.maximum(limit - end, 0.0)
            pro_area += float(np.dot(np.add.reduceat(pro_weight[lo:hi], first), area))
    result = {"auroc": u2 / (2 * n_pos * n_neg), "ap": ap / n_pos, "f1max": best_f1, "f1max_threshold": best_threshold}
    if pro_weight is not None:
        result["aupro"] = pro_area / limit
    return result


def _flat(scores, labels, name: str) -> dict:
    s, y = _as_array(scores).ravel(), _as_array(labels).ravel()
    if s.size != y.size:
        raise ValueError(f"{name}: scores has {s.size} elements but labels has {y.size}")
    return _from_sorted(*_split(s, y, name, "samples"))


def binary_metrics(scores, labels) -> dict:
    """``{"auroc", "ap", "f1max", "f1max_threshold"}`` from one split and sort of the scores.

    Any shapes with the same number of elements; labels 0/1 or bool, 1 = anomalous; higher score = more
    anomalous. Both kinds of label must be present (else ValueError).
    """
    return _flat(scores, labels, "binary_metrics")


def auroc(scores, labels) -> float:
    """Area under the ROC curve; labels 1 = anomalous, higher score = more anomalous."""
    return _flat(scores, labels, "auroc")["auroc"]


def average_precision(scores, labels) -> float:
    """Average precision (scikit-learn's step-wise definition, no interpolation)."""
    return _flat(scores, labels, "average_precision")["ap"]


def f1_max(scores, labels) -> tuple[float, float]:
    """(best F1, threshold): the maximum over thresholds t of the F1 score of ``score >= t``.

    The threshold is a score value; among thresholds with the same F1, the lowest. ValueError when
    the labels are all 0 or all 1.
    """
    result = _flat(scores, labels, "f1_max")
    return result["f1max"], result["f1max_threshold"]


def _roc_hull(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, float]:
    """(steps, excess) of one ROC curve: the steps (d FPR, d TPR) along its upper convex hull from (0, 0) to (1, 1),
    and the area between that hull and the curve."""
    if not len(normal) or not len(anomalous):
        return np.array([[float(len(normal) > 0), float(len(anomalous) > 0)]]), 0.0
    scores = np.concatenate([normal, anomalous])
    anomalous_first = np.argsort(-scores, kind="stable")
    is_anomalous = anomalous_first >= len(normal)
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores[anomalous_first])), len(scores) - 1]  # one point a threshold
    tpr = np.r_[0, np.cumsum(is_anomalous)[last_of_tie]] / len(anomalous)
    fpr = np.r_[0, np.cumsum(~is_anomalous)[last_of_tie]] / len(normal)
    hull: list[tuple[float, float]] = []
    for x, y in zip(fpr, tpr):  # monotone chain: drop the last point while it is on or under the line to (x, y)
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (y - y0) < (y1 - y0) * (x - x0):
                break
            hull.pop()
        hull.append((x, y))
    corners = np.array(hull)
    return np.diff(corners, axis=0), _area(corners[:, 0], corners[:, 1]) - _area(fpr, tpr)


def _area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the polyline through (x, y) (the trapezoid rule; np.trapezoid needs NumPy 2)."""
    return float((np.diff(x) * (y[1:] + y[:-1])).sum() / 2)


def pooled_auroc_ceiling(scores, labels, groups) -> float | None:
    """The highest pooled AUROC that any per-group rescaling of `scores` can reach, the labels known.

    A rescaling (increasing within each group) keeps every group's own ranking and only interleaves the groups.
    The best interleaving (Sidney's decomposition of chains) cuts each group's ranking into the blocks that the
    steps of its ROC curve's upper convex hull span, and takes the blocks whole, in the order of their slopes in
    pooled units (the likelihood-ratio order). The area under that merged hull counts the pairs inside a block as
    half right; the group's own ranking gets its hull-minus-curve area less, which is taken off. What no aligner
    can exceed with these per-group rankings. None when `labels` lack either kind.
    """
    scores, labels, groups = (_as_array(x).ravel() for x in (scores, labels, groups))
    anomalous = _as_bool(labels, "pooled_auroc_ceiling")
    n_normal, n_anomalous = int((~anomalous).sum()), int(anomalous.sum())
    if not n_normal or not n_anomalous:
        return None
    steps, excess = [], 0.0
    for group in np.unique(groups):
        member = groups == group
        normal, anomalous_here = member & ~anomalous, member & anomalous
        found, gap = _roc_hull(scores[normal], scores[anomalous_here])
        share = np.array([normal.sum() / n_normal, anomalous_here.sum() / n_anomalous])
        steps.append(found * share)
        excess += gap * share.prod()  # the group's own pairs are this share of all pairs
    merged = np.concatenate(steps)
    merged = merged[np.argsort(-np.arctan2(merged[:, 1], merged[:, 0]), kind="stable")]
    below = np.r_[0, np.cumsum(merged[:, 1])[:-1]]
    return float((merged[:, 0] * (below + merged[:, 1] / 2)).sum() - excess)


def _check_limit(fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    return float(fpr_limit)


def pixel_metrics(maps, masks, fpr_limit: float = 0.3, name: str = "pixel_metrics") -> dict:
    """``{"auroc", "ap", "aupro", "f1max", "f1max_threshold"}`` of anomaly maps against ground-truth masks.

    maps: N x H x W scores; masks: N x H x W, 0/1 or bool. Each is a NumPy array, a torch tensor (any
    device) or any object with ``.shape`` that slices along the first axis into those: they are read a
    chunk of images at a time. Images of different sizes (e.g. at their original resolution) come as two
    sequences (anything without ``.shape``: a list, or a lazy reader) of H_i x W_i arrays, read one image at
    a time. AUPRO counts the 8-connected components of each image's mask as regions.
    Extra memory: one sorted copy of the normal pixels' scores (4 bytes each for float32) plus ~30 bytes
    per anomalous pixel. ValueError when the masks have no anomalous pixel or no normal pixel.
    """
    fpr_limit = _check_limit(fpr_limit)
    if hasattr(maps, "shape") != hasattr(masks, "shape"):
        raise ValueError(f"{name}: give maps and masks both as N x H x W arrays or both as sequences of images")
    if hasattr(masks, "shape"):
        if len(masks.shape) != 3 or tuple(maps.shape) != tuple(masks.shape):
            raise ValueError(
                f"{name}: maps and masks must both be N x H x W; got {tuple(maps.shape)} and {tuple(masks.shape)}"
            )
    elif len(maps) != len(masks):
        raise ValueError(f"{name}: {len(maps)} maps but {len(masks)} masks")
    pos, neg, weight = _split(maps, masks, name, "pixels", regions=True)
    return _from_sorted(pos, neg, weight, fpr_limit)


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD's AUPRO).

    Regions are the 8-connected components of each N x H x W mask; the false-positive rate counts all
    normal pixels of all images. 1.0 is perfect; constant scores give fpr_limit / 2. ValueError when the
    masks have no region (or no normal pixel). See ``pixel_metrics`` for the inputs.
    """
    return pixel_metrics(maps, masks, fpr_limit, "aupro")["aupro"]


def distributed_pixel_metrics(maps, masks, fpr_limit: float = 0.3, name: str = "pixel_metrics") -> dict:
    """`pixel_metrics` over the union of every process's `maps` and `masks` (each N_r x H x W, N_r may be 0;
    torch.distributed initialised), exactly, without moving the normal pixels: each process keeps its sorted
    normal scores and only the counts below each distinct positive value are summed (see the module docstring)."""
    import torch
    import torch.distributed as dist

    pos, region_size, neg, n_regions, n_nan, n_inf = _pieces(maps, masks, name, regions=True)
    pieces: list = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (pos, region_size, n_regions, neg.size, n_nan, n_inf))
    pos = np.concatenate([p[0] for p in pieces])
    region_size = np.concatenate([p[1] for p in pieces])
    n_regions, n_neg, n_nan, n_inf = (sum(p[i] for p in pieces) for i in range(2, 6))
    _check_pieces(name, "pixels", pos.size, n_neg, n_nan, n_inf)
    pos, weight = _sort_positives(pos, region_size, n_regions)
    values = np.unique(pos)
    counts = torch.from_numpy(np.stack(negative_counts(neg, values)).astype(np.int64))
    dist.all_reduce(counts)  # every process's normal pixels below / at or below each distinct value
    below, at_or_below = counts.numpy()

    def lookup(block_values: np.ndarray):
        where = np.searchsorted(values, block_values)
        return below[where], at_or_below[where]

    return _from_counts(pos, n_neg, lookup, weight, fpr_limit)
