"""The two protocols over collected outputs: the results table, per-product decisions at one threshold, the
class-aware oracle, the calibration check."""

from __future__ import annotations

import numpy as np
import torch

from cada.align.class_aware import oracle_alignment
from cada.evaluate.collect import EvalOutputs
from cada.metrics import (
    METRICS,
    binary_metrics,
    pooled_auroc_ceiling,
)
from cada.scoring import align, aligned_scores
from cada.threshold import decision_metrics, threshold_at_fpr

PROTOCOLS = ("absolute-unified", "model-unified")
THRESHOLDS = ("i_f1max_threshold", "p_f1max_threshold")  # score values, not percentages
FPR_LIMIT = 0.3  # AUPRO integrates up to this false-positive rate
DECISIONS = ("fpr", "recall", "precision", "f1")  # at the stored threshold, when the run has one
ORACLE = "oracle"  # the class-aware reference row: per-product z-score of the image score (class names known)
REFERENCE_FPR = 0.01  # without a calibrated threshold, the pooled threshold at this FPR on the test normals
SIGNIFICANCE = 0.01  # a calibrated FPR target counts as missed when chance would flag as many normals this rarely


def _safe(metric, scores, labels) -> dict | None:
    """Metrics when both kinds of sample are present, else None (e.g. a class with no anomalous test image)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    return metric(scores, labels)


def image_scores(outputs: EvalOutputs, index: np.ndarray, aligned: bool) -> np.ndarray:
    if aligned and outputs.aligned_scores is not None:
        return outputs.aligned_scores[index]
    scores = outputs.base_scores[index]
    if not aligned:
        return scores
    offset = None if outputs.offset is None else torch.from_numpy(outputs.offset[index])
    u, spread = torch.from_numpy(outputs.u[index]), torch.from_numpy(outputs.spread[index])
    return aligned_scores(torch.from_numpy(scores), u, spread, offset).numpy()


def subset_metrics(outputs: EvalOutputs, index: np.ndarray, aligned: bool, fpr_limit: float = FPR_LIMIT) -> dict:
    """METRICS and F1-max THRESHOLDS of the images at `index`, with base or aligned scores (None: undefined)."""
    u, spread = torch.from_numpy(outputs.u[index]), torch.from_numpy(outputs.spread[index])
    row = dict.fromkeys(METRICS + THRESHOLDS)
    image = _safe(binary_metrics, image_scores(outputs, index, aligned), outputs.labels[index])
    if image:
        row.update(
            i_auroc=image["auroc"], i_ap=image["ap"], i_f1max=image["f1max"], i_f1max_threshold=image["f1max_threshold"]
        )
    keep = outputs.has_mask[index]
    pixel_index = index[keep]
    n_anomalous = int(outputs.anomalous_pixels[pixel_index].sum())
    if 0 < n_anomalous < int(outputs.pixels[pixel_index].sum()):  # both kinds of pixel present
        pixel = outputs.pixel_metrics(pixel_index, u[keep], spread[keep], aligned, fpr_limit)
        row.update(
            p_auroc=pixel["auroc"],
            p_ap=pixel["ap"],
            p_f1max=pixel["f1max"],
            aupro=pixel["aupro"],
            p_f1max_threshold=pixel["f1max_threshold"],
        )
    return row


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def threshold_metrics(
    outputs: EvalOutputs, aligned: bool, threshold: float, classes: list[str]
) -> tuple[dict, dict, dict[str, dict]]:
    """Decisions at one stored threshold: (pooled, mean over classes, per class) FPR, recall, precision, F1.

    Both summary rows also get the threshold and the spread of per-class false-positive rates: with one
    threshold for every class, an even spread is what absolute-unified alignment is for.
    """
    labels, class_names = outputs.labels, outputs.class_names
    everything = np.arange(len(labels))
    pooled = decision_metrics(image_scores(outputs, everything, aligned), labels, threshold)
    per_class = {}
    for name in classes:
        index = np.flatnonzero(class_names == name)
        per_class[name] = decision_metrics(image_scores(outputs, index, aligned), labels[index], threshold)
    averaged = {key: _mean([per_class[name][key] for name in classes]) for key in DECISIONS}
    class_fprs = [m["fpr"] for m in per_class.values() if m["fpr"] is not None]
    spread = {
        "threshold": threshold,
        "class_fpr_min": min(class_fprs, default=None),
        "class_fpr_max": max(class_fprs, default=None),
        "class_fpr_std": float(np.std(class_fprs)) if class_fprs else None,
    }
    return {**pooled, **spread}, {**averaged, **spread}, per_class


def detector_results(detector, outputs: EvalOutputs) -> dict:
    """`results_table` of a detector's outputs: its base map and, with an aligner, its aligned map, with the run's
    thresholds and class-aware oracle."""
    aligners = ("none",) if detector.settings.align == "none" else ("none", detector.settings.align)
    calibration = detector.calibration or {}
    return results_table(
        outputs,
        detector.settings.method,
        aligners,
        detector.thresholds,
        detector.training_info.get("class_score_stats"),
        calibration.get("target_fpr") if calibration.get("how") == "fpr" else None,
    )


def results_table(
    outputs: EvalOutputs,
    method: str,
    aligners: tuple[str, ...],
    thresholds: dict[str, float] | None = None,
    class_score_stats: dict | None = None,
    target_fpr: float | None = None,
) -> dict:
    """{"rows": [...], "per_class": {align: {class: metrics}}, "per_product": ...} for the base ("none") and each
    aligner.

    With `thresholds` ({align name: threshold}) rows and classes also get the decision metrics at it. With
    `class_score_stats` (the run's per-class training score statistics), "oracle" holds the rows of the class-aware
    ORACLE (image metrics only), the ceiling of any alignment of this base. "per_product" gives each product's
    median aligned normal score and its FPR and recall at one pooled threshold (see `per_product_decisions`).
    With `target_fpr` (the thresholds were calibrated at that false-positive rate), "calibration_check" says per
    threshold whether the test normals bear it out (see `calibration_check`).
    """
    class_names = outputs.class_names
    classes = sorted(set(class_names))
    everything = np.arange(len(outputs.samples))
    rows, per_class = [], {}
    for align_name in aligners:
        aligned = align_name != "none"
        per_class[align_name] = {
            name: subset_metrics(outputs, np.flatnonzero(class_names == name), aligned) for name in classes
        }
        pooled = subset_metrics(outputs, everything, aligned)
        averaged = {key: _mean([per_class[align_name][name][key] for name in classes]) for key in METRICS}
        averaged.update(dict.fromkeys(THRESHOLDS))  # no single threshold: each class has its own
        if thresholds and align_name in thresholds:
            pooled_decisions, averaged_decisions, class_decisions = threshold_metrics(
                outputs, aligned, thresholds[align_name], classes
            )
            pooled.update(pooled_decisions)
            averaged.update(averaged_decisions)
            for name in classes:
                per_class[align_name][name].update(class_decisions[name])
        for protocol, metrics in zip(PROTOCOLS, (pooled, averaged)):
            rows.append({"method": method, "align": align_name, "protocol": protocol, **metrics})
    scores = {name: image_scores(outputs, everything, name != "none") for name in aligners}
    defects = np.array([s.defect for s in outputs.samples])
    results = {"rows": rows, "per_class": per_class}
    oracle = oracle_scores(outputs, class_score_stats)
    if oracle is not None:
        scores[ORACLE] = oracle
        results["oracle"] = [
            {"method": method, "align": ORACLE, "protocol": protocol, **metrics}
            for protocol, metrics in zip(PROTOCOLS, image_only_metrics(oracle, outputs.labels, class_names))
        ]
    results["per_product"] = {
        name: per_product_decisions(values, outputs.labels, class_names, (thresholds or {}).get(name), defects)
        for name, values in scores.items()
    }
    if target_fpr is not None and thresholds:
        results["calibration_check"] = {
            name: calibration_check(scores[name], outputs.labels, class_names, threshold, target_fpr)
            for name, threshold in thresholds.items()
            if name in scores
        }
    return results


def calibration_check(
    scores: np.ndarray, labels: np.ndarray, class_names: np.ndarray, threshold: float, target_fpr: float
) -> dict:
    """How many test normals a threshold calibrated at `target_fpr` flags, pooled and per product, with the chance
    of flagging at least as many if the target held (binomial tail); "missed" where that chance is below
    SIGNIFICANCE, and "holds" when nothing is missed: otherwise the calibration images scored lower than these
    normals (on realmix's magnetic_tile with PatchCore: held-out images whose other captures stayed in the bank)."""
    from scipy.stats import binom

    def counted(normal: np.ndarray) -> dict:
        flagged = int((normal >= threshold).sum())
        chance = float(binom.sf(flagged - 1, len(normal), target_fpr)) if flagged else 1.0
        return {
            "normals": len(normal),
            "flagged": flagged,
            "fpr": flagged / len(normal),
            "p_value": chance,
            "missed": chance < SIGNIFICANCE,
        }

    normal = labels == 0
    pooled = counted(scores[normal]) if normal.any() else None
    products = {str(name): counted(scores[normal & (class_names == name)]) for name in sorted(set(class_names[normal]))}
    return {
        "target_fpr": target_fpr,
        "threshold": float(threshold),
        "holds": not any(block and block["missed"] for block in [pooled, *products.values()]),
        "pooled": pooled,
        "products": products,
    }


def oracle_scores(outputs: EvalOutputs, class_score_stats: dict | None) -> np.ndarray | None:
    """Image scores aligned by the class-aware oracle, or None without statistics for every test class."""
    alignment = oracle_alignment(class_score_stats or {}, list(outputs.class_names))
    if alignment is None:
        return None
    u, gamma = alignment
    return align(torch.from_numpy(outputs.base_scores), u, (gamma - u).clamp(min=1e-12)).numpy()


def image_only_metrics(scores: np.ndarray, labels: np.ndarray, class_names: np.ndarray) -> tuple[dict, dict]:
    """(pooled, mean over classes) rows with the image metrics of `scores` and None for every pixel metric."""
    rows = []
    groups = [[np.arange(len(labels))], [np.flatnonzero(class_names == name) for name in sorted(set(class_names))]]
    for indices in groups:
        found = [_safe(binary_metrics, scores[index], labels[index]) for index in indices]
        row = dict.fromkeys(METRICS + THRESHOLDS)
        for key, source in (("i_auroc", "auroc"), ("i_ap", "ap"), ("i_f1max", "f1max")):
            row[key] = _mean([m[source] if m else None for m in found])
        rows.append(row)
    return rows[0], rows[1]


def per_product_decisions(
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: np.ndarray,
    threshold: float | None,
    defects: np.ndarray | None = None,
) -> dict:
    """Each product's I-AUROC, median normal score, and FPR and recall at ONE pooled threshold: the calibrated one
    when given, else the threshold at REFERENCE_FPR of the pooled test normals (an after-the-fact reference).
    With `defects` (each image's defect type), each product also gets "defects": per defect type its image count,
    I-AUROC against the product's normals and recall at that threshold, which says what the detector misses.

    "normals_aligned_i_auroc" is the mean of the products' I-AUROC weighted by their anomalous images: the pooled
    I-AUROC of any alignment that puts every product's normal scores on one distribution (each anomaly then
    ranks against all normals as against its own product's). It, not the plain per-product mean, is the figure
    to hold a pooled I-AUROC against: the pooled ranking weighs products by their anomalies, so a hard product
    with many defects pulls it down however well the products are aligned. "ceiling_i_auroc" is the most any
    per-product rescaling of these scores could reach, the test labels known (`pooled_auroc_ceiling`): what lies
    between it and the per-product figures no aligner can close, only a better ranking inside the products.
    """
    source = "calibrated"
    if threshold is None:
        threshold, source = (
            threshold_at_fpr(scores[labels == 0], REFERENCE_FPR, new_images=False),
            f"{REFERENCE_FPR:.0%} FPR on test normals",
        )
    products, weighted, anomalies = {}, 0.0, 0
    for name in sorted(set(class_names)):
        index = class_names == name
        normal = scores[index & (labels == 0)]
        decisions = decision_metrics(scores[index], labels[index], threshold)
        ranking = _safe(binary_metrics, scores[index], labels[index])
        products[name] = {
            "i_auroc": ranking["auroc"] if ranking else None,
            "median_normal_score": float(np.median(normal)) if normal.size else None,
            "fpr": decisions["fpr"],
            "recall": decisions["recall"],
        }
        if defects is not None:
            products[name]["defects"] = _per_defect(scores, labels, index, defects, threshold)
        if ranking:
            count = int((labels[index] == 1).sum())
            weighted, anomalies = weighted + count * ranking["auroc"], anomalies + count
    return {
        "threshold": float(threshold),
        "threshold_source": source,
        "normals_aligned_i_auroc": weighted / anomalies if anomalies else None,
        "ceiling_i_auroc": pooled_auroc_ceiling(scores, labels, class_names),
        "products": products,
    }


def _per_defect(scores: np.ndarray, labels: np.ndarray, product: np.ndarray, defects: np.ndarray, threshold) -> dict:
    """{defect type: {"n", "i_auroc" against the product's normals, "recall" at `threshold`}} of one product."""
    normal = scores[product & (labels == 0)]
    found = {}
    for defect in sorted(set(defects[product & (labels == 1)])):
        anomalous = scores[product & (labels == 1) & (defects == defect)]
        both = np.concatenate([normal, anomalous])
        ranking = _safe(binary_metrics, both, np.r_[np.zeros(len(normal), int), np.ones(len(anomalous), int)])
        found[str(defect)] = {
            "n": len(anomalous),
            "i_auroc": ranking["auroc"] if ranking else None,
            "recall": float((anomalous >= threshold).mean()),
        }
    return found
