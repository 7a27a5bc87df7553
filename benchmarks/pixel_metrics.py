"""Pixel-metric speed and memory: all of cada's exact pixel metrics against scikit-learn's AUROC + AP.

    python benchmarks/pixel_metrics.py [n_maps]      # default 1725 maps of 256x256 (MVTec AD size, ~113M pixels)

cada: P-AUROC, P-AP, P-F1-max and AUPRO (FPR limit 0.3) from one call of cada.metrics.pixel_metrics.
scikit-learn: roc_auc_score + average_precision_score on the flattened pixels (it has no AUPRO).
Each runs in a fresh subprocess that makes the same data, then resets its peak-RSS counter, so the
reported peak is that of the metric call on top of the data (maps float32 + masks bool, ~0.55 GiB).
"""

import resource
import subprocess
import sys
import time

import numpy as np

SIZE = 256


def blob_masks(n_maps: int, rng: np.random.Generator) -> np.ndarray:
    """Irregular blobs on 2/3 of the images (1-4 each: ellipses with wobbly, rotated outlines), none on 1/3."""
    masks = np.zeros((n_maps, SIZE, SIZE), bool)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    for image in range(n_maps):
        if image % 3 == 0:
            continue
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, SIZE, 2)
            a, b = rng.uniform(3, 35, 2)
            angle, phase = rng.uniform(0, np.pi, 2)
            lobes, wobble = rng.integers(2, 6), rng.uniform(0.1, 0.35)
            top, bottom = int(max(cy - 1.4 * max(a, b), 0)), int(min(cy + 1.4 * max(a, b) + 1, SIZE))
            left, right = int(max(cx - 1.4 * max(a, b), 0)), int(min(cx + 1.4 * max(a, b) + 1, SIZE))
            dy, dx = yy[top:bottom, left:right] - cy, xx[top:bottom, left:right] - cx
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            radius = 1 + wobble * np.sin(lobes * np.arctan2(v, u) + phase)
            masks[image, top:bottom, left:right] |= (u / a) ** 2 + (v / b) ** 2 <= radius**2
    return masks


def anomaly_maps(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 noise, higher inside the blobs; made in place (no float64 temporaries)."""
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    maps[masks] += 1.5
    return maps


def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(which: str, n_maps: int):
    rng = np.random.default_rng(0)
    masks = blob_masks(n_maps, rng)
    maps = anomaly_maps(masks, rng)
    import sklearn.metrics as skm  # imports before the clock and the peak counter start

    from cada.metrics import pixel_metrics

    exact_peak = _reset_peak()
    with open("/proc/self/statm") as f:  # current RSS before the metric runs
        rss0 = int(f.read().split()[1]) * resource.getpagesize() / 2**30
    t0 = time.perf_counter()
    if which == "cada":
        res = pixel_metrics(maps, masks)
        figures = f"auroc={res['auroc']:.12f} ap={res['ap']:.12f} f1max={res['f1max']:.6f} aupro={res['aupro']:.6f}"
    else:
        y, s = masks.ravel(), maps.ravel()
        figures = f"auroc={skm.roc_auc_score(y, s):.12f} ap={skm.average_precision_score(y, s):.12f}"
    dt = time.perf_counter() - t0
    peak = _peak_gib()
    note = "" if exact_peak else " (peak includes data generation)"
    print(
        f"{which:8s} {n_maps} maps, {masks.size:,} px, {masks.mean():.2%} anomalous  {dt:6.1f} s  "
        f"peak RSS {peak:5.2f} GiB (data {rss0:.2f}, +{peak - rss0:.2f}){note}  {figures}",
        flush=True,
    )


def main():
    if len(sys.argv) > 2:  # child process: make the data and run one method
        child(sys.argv[1], int(sys.argv[2]))
        return
    n_maps = sys.argv[1] if len(sys.argv) > 1 else "1725"
    for which in ("cada", "sklearn"):
        subprocess.run([sys.executable, __file__, which, n_maps], check=False)


if __name__ == "__main__":
    main()
