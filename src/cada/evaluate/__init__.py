"""Evaluation: collecting a detector's outputs (collect.py), the two protocols and the results table
(protocols.py), the results as text (text.py).

absolute-unified: every test image of every class pooled, one ROC/PR curve (one threshold for all).
model-unified: the same metrics per class, then averaged over classes (each class its own threshold).

Metrics (fractions; None where undefined, e.g. pixel metrics of a class without anomalous pixels):
I-AUROC, I-AP, I-F1-max, P-AUROC, P-AP, P-F1-max and AUPRO (FPR limit 0.3), all exact (cada.metrics).
The F1-max thresholds are reported for absolute-unified rows and per class; model-unified rows have
none (each class has its own), so they are None there.
"""

from cada.evaluate.collect import PIXEL_RESOLUTIONS, DistributedEvalOutputs, EvalOutputs, collect
from cada.evaluate.protocols import (
    DECISIONS,
    FPR_LIMIT,
    ORACLE,
    PROTOCOLS,
    REFERENCE_FPR,
    SIGNIFICANCE,
    THRESHOLDS,
    calibration_check,
    detector_results,
    image_only_metrics,
    image_scores,
    oracle_scores,
    per_product_decisions,
    results_table,
    subset_metrics,
    threshold_metrics,
)
from cada.evaluate.text import (
    format_calibration_check,
    format_decisions,
    format_per_class,
    format_per_product,
    format_table,
    percent,
)
from cada.metrics import HEADERS, METRICS

__all__ = [
    "DECISIONS",
    "FPR_LIMIT",
    "HEADERS",
    "METRICS",
    "ORACLE",
    "PIXEL_RESOLUTIONS",
    "PROTOCOLS",
    "REFERENCE_FPR",
    "SIGNIFICANCE",
    "THRESHOLDS",
    "DistributedEvalOutputs",
    "EvalOutputs",
    "calibration_check",
    "collect",
    "detector_results",
    "format_calibration_check",
    "format_decisions",
    "format_per_class",
    "format_per_product",
    "format_table",
    "image_only_metrics",
    "image_scores",
    "oracle_scores",
    "per_product_decisions",
    "percent",
    "results_table",
    "subset_metrics",
    "threshold_metrics",
]
