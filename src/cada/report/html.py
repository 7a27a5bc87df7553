"""One self-contained HTML page per evaluation: tables, score distributions, and a gallery of test images.

Everything (figures, thumbnails) is embedded as base64 PNG, so the page is one file to mail or archive.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cada.data.dataset import load_image
from cada.evaluate import DECISIONS, EvalOutputs, format_calibration_check, image_scores, percent
from cada.files import atomic_write
from cada.metrics import HEADERS, METRICS
from cada.predict import HEATMAP_MAX, overlay

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { padding: .25em .7em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.aligned { background: #f2f8ff; } .meta { color: #666; font-size: .9em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; image-rendering: pixelated; }
figcaption { font-size: .85em; } .anomalous { color: #c0392b; font-weight: 600; } .normal { color: #1f6fb2; }
"""


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_percent = functools.partial(percent, missing="–")


def _results_table(results: dict) -> str:
    has_decisions = any(row.get("fpr") is not None for row in results["rows"])
    extra = ["FPR at threshold", "recall", "F1", "per-class FPR"] if has_decisions else []
    head = "".join(f"<th>{h}</th>" for h in ["align", "protocol", *HEADERS, *extra])
    body = []
    for row in results["rows"] + results.get("oracle", []):
        cells = [row["align"], row["protocol"], *(_percent(row.get(k)) for k in METRICS)]
        if has_decisions:
            cells += [
                _percent(row.get("fpr")),
                _percent(row.get("recall")),
                _percent(row.get("f1")),
                f"{_percent(row.get('class_fpr_min'))}–{_percent(row.get('class_fpr_max'))}",
            ]
        css = ' class="aligned"' if row["align"] != "none" else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _per_product_table(results: dict) -> str:
    """Per alignment and product: median normal score, FPR and recall at one pooled threshold, and each defect
    type's I-AUROC and recall."""
    head = "".join(
        f"<th>{h}</th>"
        for h in [
            "align",
            "product",
            "median normal score",
            "FPR",
            "recall",
            "by defect: n, I-AUROC / recall",
            "threshold",
        ]
    )
    body = []
    for align_name, block in results.get("per_product", {}).items():
        for product, values in block["products"].items():
            median = values["median_normal_score"]
            cells = [
                align_name,
                product,
                "–" if median is None else f"{median:.3g}",
                _percent(values["fpr"]),
                _percent(values["recall"]),
                "; ".join(
                    f"{defect} ({d['n']}) {_percent(d['i_auroc'])} / {_percent(d['recall'])}"
                    for defect, d in values.get("defects", {}).items()
                ),
                f"{block['threshold']:.4g} ({block['threshold_source']})",
            ]
            css = ' class="aligned"' if align_name != "none" else ""
            body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _per_class_table(results: dict) -> str:
    has_decisions = any(m.get("fpr") is not None for classes in results["per_class"].values() for m in classes.values())
    keys = ("i_auroc", "i_ap", "p_auroc", "p_ap", "aupro", *(DECISIONS if has_decisions else ()))
    head = "".join(f"<th>{h}</th>" for h in ["align", "class", *keys])
    body = []
    for align_name, classes in results["per_class"].items():
        for name, metrics in classes.items():
            cells = [align_name, name, *(_percent(metrics.get(k)) for k in keys)]
            css = ' class="aligned"' if align_name != "none" else ""
            body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _tile(outputs: EvalOutputs, index: int, size: int) -> np.ndarray:
    """Image | heatmap overlay (fixed aligned scale) | ground-truth mask, side by side."""
    sample = outputs.samples[index]
    image = load_image(sample.path, size, outputs.resize)[0].permute(1, 2, 0).numpy()
    aligned_map = outputs.aligned_map(index)
    mask = outputs.masks[index].numpy()
    mask_rgb = np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    gap = np.full((size, 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, overlay(image, aligned_map.numpy()), gap, mask_rgb], axis=1)


def _gallery(outputs: EvalOutputs, indices: list[int], scores: np.ndarray, threshold: float | None, size: int) -> str:
    figures = []
    for index in indices:
        sample = outputs.samples[index]
        truth = f'<span class="{"anomalous" if sample.label else "normal"}">{html.escape(sample.defect)}</span>'
        decision = "" if threshold is None else (" · flagged" if scores[index] >= threshold else " · passed")
        caption = (
            f"{html.escape(sample.class_name)} / {truth} · score {scores[index]:.3f}{decision}<br>"
            f"<span class=meta>{html.escape(Path(sample.path).name)}</span>"
        )
        figures.append(
            f'<figure><img src="{_png(_tile(outputs, index, size))}" alt="{html.escape(str(sample.path))}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(figures)}</div>'


def write_report(
    folder: str | Path,
    results: dict,
    outputs: EvalOutputs,
    detector,
    figures: Sequence[tuple[str, Path]] = (),
    per_side: int = 8,
) -> Path:
    """Write FOLDER/report.html and return its path; `figures`: (title, PNG file) shown in that order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aligned = detector.settings.align != "none"
    scores = image_scores(outputs, np.arange(len(outputs.samples)), aligned)
    order = np.argsort(-scores, kind="stable")
    size = detector.settings.input_size
    threshold = detector.threshold if aligned else (detector.calibration or {}).get("base_threshold")
    meta = results.get("meta", {})
    calibration = detector.calibration
    threshold_line = (
        "no threshold yet: run <code>cada calibrate</code>"
        if calibration is None
        else f"threshold {calibration['threshold']:.4f} ({calibration['how']}, {html.escape(calibration['source'])})"
    )
    sections = [
        f"<h1>cada evaluation: {html.escape(detector.settings.method)} + {html.escape(detector.settings.align)}</h1>",
        f"<p class=meta>data {html.escape(str(meta.get('data', '')))} · {meta.get('n_test_images', len(scores))} test "
        f"images · {html.escape(detector.settings.backbone)} at {size}px · {threshold_line}</p>",
        "<h2>Results</h2><p>absolute-unified: all classes pooled, one threshold; model-unified: per class, then "
        "averaged. Percent.</p>",
        _results_table(results),
        *(f"<p class=anomalous>{html.escape(line)}</p>" for line in format_calibration_check(results)),
        "<h2>Per class</h2>",
        _per_class_table(results),
        "<h2>Per product at one pooled threshold</h2><p>oracle: each product's image scores z-scored with its own "
        "training images (class names known). Pooled I-AUROC if every product's normals were aligned, and the most "
        "any per-product rescaling could reach (test labels known): "
        + "; ".join(
            f"{html.escape(name)} {_percent(block['normals_aligned_i_auroc'])}, {_percent(block['ceiling_i_auroc'])}"
            for name, block in results.get("per_product", {}).items()
        )
        + ".</p>",
        _per_product_table(results),
    ]
    for title, figure in figures:
        data = base64.b64encode(Path(figure).read_bytes()).decode()
        sections += [
            f"<h2>{html.escape(title)}</h2>",
            f'<img src="data:image/png;base64,{data}" style="max-width:100%">',
        ]
    legend = (
        f"Each tile: the image, its {'aligned ' if aligned else ''}anomaly map over it (one fixed colour scale "
        f"for every image, 0 to {HEATMAP_MAX:g}: blue is normal, red far above normal), and the ground-truth mask."
    )
    sections += [
        f"<h2>Most anomalous test images</h2><p class=meta>{legend}</p>",
        _gallery(outputs, order[:per_side].tolist(), scores, threshold, size),
        "<h2>Least anomalous test images</h2>",
        _gallery(outputs, order[::-1][:per_side].tolist(), scores, threshold, size),
    ]
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>cada report</title><style>{STYLE}</style>"
        f"</head><body>{''.join(sections)}</body></html>"
    )
    path = folder / "report.html"
    return atomic_write(path, page)  # names that are not UTF-8 come out escaped
