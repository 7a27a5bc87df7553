"""The results as text: the tables `cada evaluate` prints."""

from __future__ import annotations

import math

from cada.evaluate.protocols import SIGNIFICANCE
from cada.metrics import (
    HEADERS,
    METRICS,
)


def format_calibration_check(results: dict) -> list[str]:
    """One warning per calibrated threshold that the test normals contradict (empty when all hold)."""
    lines = []
    for name, check in results.get("calibration_check", {}).items():
        blocks = [("all products", check["pooled"]), *check["products"].items()]
        missed = ", ".join(
            f"{label} {percent(block['fpr'])}% ({block['flagged']} of {block['normals']})"
            for label, block in blocks
            if block and block["missed"]
        )
        if missed:
            lines.append(
                f"warning ({name}): the threshold calibrated at {percent(check['target_fpr'])}% FPR flags more test "
                f"normals than chance allows (p < {SIGNIFICANCE}): {missed}. The calibration images scored lower "
                "than these normals (repeated captures of parts that stay in training? test normals unlike the "
                "training ones?); calibrate on normals of other parts: cada calibrate RUN --normal DIR"
            )
    return lines


def percent(value: float | None, missing: str = "-") -> str:
    """A rate in [0, 1] as a percentage with one decimal, `missing` for None (text and HTML reports)."""
    return missing if value is None else f"{100 * value:.1f}"


def format_per_product(results: dict) -> str:
    """Per product and alignment: median normal score, FPR and recall (percent) at one pooled threshold."""
    lines = []
    for name, block in results.get("per_product", {}).items():
        lines.append(
            f"  {name} (threshold {block['threshold']:.4g}, {block['threshold_source']}; pooled I-AUROC with "
            f"every product's normals aligned: {percent(block['normals_aligned_i_auroc'])}, at most "
            f"{percent(block['ceiling_i_auroc'])} with any per-product rescaling):"
        )
        for product, values in block["products"].items():
            median = "-" if values["median_normal_score"] is None else f"{values['median_normal_score']:.3g}"
            rates = " ".join(f"{key}={percent(values[key])}" for key in ("i_auroc", "fpr", "recall"))
            lines.append(f"    {product:<16} median normal {median:>8}  {rates}")
            if len(values.get("defects", {})) > 1:  # one type would repeat the product's line
                lines.append(
                    "      by defect (n, i_auroc/recall): "
                    + ", ".join(
                        f"{defect} ({d['n']}) {percent(d['i_auroc'])}/{percent(d['recall'])}"
                        for defect, d in values["defects"].items()
                    )
                )
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The rows (and the oracle's, when present) as an aligned text table, metrics in percent."""
    header = ["method", "align", "protocol", *HEADERS]
    lines = [
        [row["method"], row["align"], row["protocol"]]
        + ["-" if row.get(key) is None or math.isnan(row[key]) else f"{100 * row[key]:.1f}" for key in METRICS]
        for row in results["rows"] + results.get("oracle", [])
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(  # noqa: E731 - a one-line formatter
        str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(line) for line in lines])


def format_decisions(results: dict) -> str:
    """Decisions at the stored threshold: pooled and per-class-mean FPR, recall, precision, F1, FPR range."""
    lines = [f"{'align':<11} {'protocol':<17} {'FPR':>6} {'recall':>7} {'prec.':>6} {'F1':>6}  per-class FPR"]
    for row in results["rows"]:
        if row.get("fpr") is None and row.get("recall") is None:
            continue
        lines.append(
            f"{row['align']:<11} {row['protocol']:<17} {percent(row['fpr']):>6} {percent(row['recall']):>7} "
            f"{percent(row['precision']):>6} {percent(row['f1']):>6}  "
            f"{percent(row['class_fpr_min'])}-{percent(row['class_fpr_max'])} (std {percent(row['class_fpr_std'])})"
        )
    return "\n".join(lines)


def format_per_class(results: dict) -> str:
    """One line per aligner and class, metrics in percent ("-": undefined)."""
    lines = []
    for align_name, classes in results["per_class"].items():
        for name, metrics in classes.items():
            cells = " ".join(f"{key}={percent(metrics.get(key))}" for key in METRICS)
            lines.append(f"  {align_name:<6} {name:<16} {cells}")
    return "\n".join(lines)
