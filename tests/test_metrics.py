"""Tests for cada.metrics against scikit-learn.

Running this file directly (``PYTHONPATH=src python tests/test_metrics.py [n_maps]``)
instead times ``binary_metrics`` and scikit-learn on pixel-sized data; see ``_bench``.
"""

import numpy as np
import pytest
import torch

from cada.metrics import auroc, average_precision, binary_metrics

skm = pytest.importorskip("sklearn.metrics")

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


def _bench():
    """By hand: time and peak RSS on 1725 maps of 256x256 float32 (~113M pixels, ~3% anomalous).

    Each method runs in a fresh subprocess so ru_maxrss is its own peak.
    """
    import resource
    import subprocess
    import sys
    import time

    if len(sys.argv) > 2:  # child process: generate the data and run one method
        which, n_maps = sys.argv[1], int(sys.argv[2])
        rng = np.random.default_rng(0)
        blobs = rng.random((n_maps, 16, 16)) < 0.03  # 16x16-pixel anomalous blocks
        labels = blobs.repeat(16, axis=1).repeat(16, axis=2)
        scores = rng.standard_normal(labels.shape, dtype=np.float32)
        scores[labels] += 1.5  # (1.5 * labels would allocate a float64 array)
        with open("/proc/self/statm") as f:  # Linux: current RSS before the metric runs
            rss0 = int(f.read().split()[1]) * resource.getpagesize() / 2**30
        t0 = time.perf_counter()
        if which == "cada":
            res = binary_metrics(scores, labels)
        else:
            y, s = labels.ravel(), scores.ravel()
            res = {"auroc": skm.roc_auc_score(y, s), "ap": skm.average_precision_score(y, s)}
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{which:8s} n={scores.size:,} pos={labels.mean():.3%}  {dt:6.1f} s  "
              f"peak RSS {rss:5.2f} GiB (before: {rss0:.2f} GiB, +{rss - rss0:.2f})  "
              f"auroc={res['auroc']:.12f} ap={res['ap']:.12f}", flush=True)
        return
    n_maps = sys.argv[1] if len(sys.argv) > 1 else "1725"
    for which in ("cada", "sklearn"):
        subprocess.run([sys.executable, __file__, which, n_maps], check=False)


if __name__ == "__main__":
    _bench()
