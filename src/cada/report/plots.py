"""Per-class image-score distributions before and after alignment (the paper's Fig. 5); the training loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cada.evaluate import EvalOutputs, image_scores
from cada.files import atomic_write
from cada.metrics import auroc

NORMAL_COLOUR, ANOMALOUS_COLOUR = "#2b6cb0", "#d9480f"


def _strip(
    axis, scores: np.ndarray, labels: np.ndarray, class_names: np.ndarray, classes: list[str], rng: np.random.Generator
) -> None:
    """One column per class: normal images left, anomalous right, jittered so that every image is a dot."""
    for position, name in enumerate(classes):
        for offset, label, colour in ((-0.18, 0, NORMAL_COLOUR), (0.18, 1, ANOMALOUS_COLOUR)):
            values = scores[(class_names == name) & (labels == label)]
            if values.size == 0:
                continue
            jitter = rng.uniform(-0.12, 0.12, values.size)
            axis.scatter(position + offset + jitter, values, s=9, alpha=0.6, color=colour, linewidths=0)
            axis.hlines(np.median(values), position + offset - 0.15, position + offset + 0.15, color="black", lw=1.5)
    axis.set_xticks(
        range(len(classes)),
        classes,
        rotation=30 if len(classes) > 6 else 0,
        ha="right" if len(classes) > 6 else "center",
    )
    axis.set_xlim(-0.6, len(classes) - 0.4)
    axis.grid(axis="y", alpha=0.3)


def score_distributions(outputs: EvalOutputs, path: str | Path, align_name: str = "cada") -> Path:
    """One PNG of evaluation `outputs`: top row the base image scores per class, bottom row the aligned ones.

    The dashed line is the one pooled threshold with the best balanced accuracy (TPR - FPR, Youden's J; F1 would
    drift low when most test images are anomalous): where the normal dots of some class sit above it and
    anomalous dots of another below it, one threshold cannot serve every class.
    """
    plt = _pyplot()

    base_scores, labels, class_names = outputs.base_scores, outputs.labels, outputs.class_names
    classes = sorted(set(class_names))
    aligned = image_scores(outputs, np.arange(len(base_scores)), aligned=True)
    rows = [("base map (no alignment)", base_scores)]
    if align_name != "none":
        rows.append((f"aligned ({align_name})", aligned))
    figure, axes = plt.subplots(
        len(rows), 1, figsize=(max(7.0, 1.8 * len(classes) + 3), 3.6 * len(rows)), squeeze=False
    )
    rng = np.random.default_rng(0)
    for axis, (title, scores) in zip(axes[:, 0], rows):
        _strip(axis, scores, labels, class_names, classes, rng)
        both = labels.any() and not labels.all()
        if both:
            threshold = balanced_threshold(scores, labels)
            axis.axhline(threshold, color="black", ls="--", lw=1)
            title += f": all classes pooled, I-AUROC {100 * auroc(scores, labels):.1f}"
        axis.set_title(title, fontsize=11, loc="left")
        axis.set_ylabel("image score")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=NORMAL_COLOUR, label="normal"),
        plt.Line2D([], [], marker="o", ls="", color=ANOMALOUS_COLOUR, label="anomalous"),
        plt.Line2D([], [], color="black", ls="--", label="one threshold for all\n(best TPR - FPR, pooled)"),
        plt.Line2D([], [], color="black", label="median"),
    ]
    axes[0, 0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    return _save(figure, path, dpi=120)


def balanced_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (score >= t is anomalous) that maximises TPR - FPR."""
    labels = np.asarray(labels, dtype=bool)
    candidates = np.unique(scores)
    sorted_normal, sorted_anomalous = np.sort(scores[~labels]), np.sort(scores[labels])
    tpr = 1 - np.searchsorted(sorted_anomalous, candidates, side="left") / max(1, sorted_anomalous.size)
    fpr = 1 - np.searchsorted(sorted_normal, candidates, side="left") / max(1, sorted_normal.size)
    return float(candidates[np.argmax(tpr - fpr)])


def loss_curves(rows: list[dict], path: str | Path) -> Path:
    """One PNG, one panel per training stage (cada.engine.log rows): the loss of every step (light) and its
    running mean over 5% of the stage (dark), on a log scale when every loss is positive; the learning rate on
    the right axis."""
    plt = _pyplot()

    stages = list(dict.fromkeys(row["stage"] for row in rows))
    figure, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.4), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        steps = np.array([row["step"] for row in rows if row["stage"] == stage])
        losses = np.array([row["loss"] for row in rows if row["stage"] == stage])
        window = max(1, len(losses) // 20)
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps, losses, color=NORMAL_COLOUR, alpha=0.3, lw=0.8)
        axis.plot(steps[window - 1 :], running, color=NORMAL_COLOUR, lw=1.8, label="loss")
        if (losses > 0).all():
            axis.set_yscale("log")
        rates = axis.twinx()
        rates.plot(steps, [row["lr"] for row in rows if row["stage"] == stage], color=ANOMALOUS_COLOUR, lw=1)
        rates.set_ylabel("learning rate", color=ANOMALOUS_COLOUR)
        axis.set_title(f"{stage}: {len(steps)} steps", fontsize=11, loc="left")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    return _save(figure, path, dpi=110)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path, dpi: int) -> Path:
    """The figure as a PNG at `path` (written atomically), then closed."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi, format="png"))
    _pyplot().close(figure)
    return path
