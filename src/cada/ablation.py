"""The paper's ablations (Tables 3, 4, 5) on any data, training the base method once.

The base method is trained (or loaded) once; its training-set statistics (aligner inputs and targets) and its
test outputs (maps, image scores, aligner inputs) are computed once. Each variant then only fits an aligner on
the cached training statistics and re-aligns the cached test outputs, which takes seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from cada.align import Aligner, create_aligner
from cada.api import Detector
from cada.data.dataset import load_all
from cada.data.mvtec import Sample
from cada.evaluate import EvalOutputs, collect, results_table
from cada.metrics import METRIC_HEADERS
from cada.scoring import image_score

ABLATION_METRICS = ("i_auroc", "i_ap", "p_auroc", "p_ap")  # the columns of the paper's Tables 3-5


@dataclass
class Variant:
    """One row: an aligner and the settings it differs in."""

    label: str
    align: str
    changes: dict = dataclasses.field(default_factory=dict)  # AlignTraining fields
    top_fraction: float | None = None  # image-score reduction, None = the run's


def table_3() -> list[Variant]:
    """Regressor structure, dropout rate and image-score reduction (paper Table 3)."""
    structures = [
        ("1 linear", 0, 1),
        ("2 linear", 0, 2),
        ("3 linear", 0, 3),
        ("1 conv, 2 linear", 1, 2),
        ("2 conv, 2 linear", 2, 2),
    ]
    rows = [
        Variant(f"structure: {name}", "cada", {"convs": convs, "linears": linears})
        for name, convs, linears in structures
    ]
    rows += [Variant(f"dropout {rate}", "cada", {"dropout": rate}) for rate in (0.0, 0.25, 0.5, 0.75)]
    rows += [
        Variant(f"score: {name}", "cada", top_fraction=fraction)
        for name, fraction in (("max", 0.0), ("top 0.1%", 0.001), ("top 1%", 0.01), ("top 2%", 0.02))
    ]
    return rows


def table_4() -> list[Variant]:
    """Class-aware or agnostic (paper Table 4)."""
    return [
        Variant("CaDA-A (class labels at train and test)", "class-aware"),
        Variant("CaDA-B (class labels at train only)", "classifier"),
        Variant("CADA (no class labels)", "cada"),
    ]


def table_5() -> list[Variant]:
    """(u, gamma) or (u, sigma) (paper Table 5)."""
    return [Variant("CADA (u, gamma)", "cada"), Variant("CADA (u, sigma)", "cada-sigma")]


class Ablation:
    """Cached base outputs of one trained detector, and the variants evaluated on them."""

    def __init__(
        self,
        detector: Detector,
        train_samples: list[Sample],
        test_samples: list[Sample],
        progress: bool = True,
        calibration_samples: list[Sample] | None = None,
    ):
        """`calibration_samples`: held-out normal images whose outputs are cached too, to calibrate thresholds."""
        started = time.perf_counter()
        self.detector = detector
        if detector.settings.tile > 1:
            raise ValueError(
                "ablations re-fit aligners on one view per image; a tiled run (tile > 1) has several: not supported"
            )
        images, kept = load_all(train_samples, detector.settings.image_size, resize=detector.settings.resize)
        trained_on = detector.training_info.get("n_images")
        if trained_on is not None and trained_on != len(images):
            # the training-set maps must be of the very images the base was fitted on (PatchCore leaves each
            # image's own bank rows out by its index)
            raise ValueError(
                f"the run was trained on {trained_on} images, not these {len(images)}: give the training images "
                "it was fitted on"
            )
        # On the CPU, with the test outputs (Detector.infer returns CPU tensors): the variants' aligners are small.
        self.train_features, self.train_stats = (t.cpu() for t in detector.training_statistics(images))
        self.train_class_names = [s.class_name for s in kept]
        self.test = collect(detector, test_samples, progress=progress, keep_features=True)
        self.calibration = (
            collect(detector, calibration_samples, progress=progress, keep_features=True)
            if calibration_samples
            else None
        )
        self.cache_seconds = time.perf_counter() - started

    def base_rows(self) -> dict[str, dict]:
        return self._rows(self.test, "none")

    def fit(self, variant: Variant) -> Aligner:
        """The variant's aligner, fitted on the cached training statistics."""
        settings = copy.deepcopy(self.detector.settings)
        settings.aligner = dataclasses.replace(settings.aligner, **variant.changes)
        if settings.aligner.smooth_l1_alpha is None:  # as Detector.fit_aligner: the base method's own scale
            settings.aligner.smooth_l1_alpha = self.detector.method.score_scale
        settings.align = variant.align
        torch.manual_seed(settings.seed)
        aligner = create_aligner(variant.align, self.train_features.shape[1], settings.aligner)
        aligner.fit(
            self.train_features,
            self.train_stats,
            settings.aligner,
            torch.Generator().manual_seed(settings.seed),
            self.train_class_names,
            progress=False,
        )
        return aligner.eval()

    @staticmethod
    def aligned(aligner: Aligner, outputs: EvalOutputs) -> EvalOutputs:
        """Cached outputs with (u, spread) and the score offset of `aligner`, from their cached align features."""
        if outputs.align_features is None:
            raise ValueError("re-aligning needs the align features: collect the outputs with keep_features=True")
        class_names = list(outputs.class_names) if aligner.needs_class_names else None
        with torch.inference_mode():
            u, gamma = aligner.stats(outputs.align_features, class_names)
            spread = aligner.spread(u, gamma)
            offset = aligner.score_offset(outputs.align_features)
        return dataclasses.replace(
            outputs, u=u.numpy(), spread=spread.numpy(), offset=None if offset is None else offset.numpy()
        )

    def run(self, variant: Variant) -> tuple[dict[str, dict], float]:
        """Fit the variant's aligner on the cached training statistics and evaluate it; (rows, seconds)."""
        started = time.perf_counter()
        outputs = self.aligned(self.fit(variant), self.test)
        if variant.top_fraction is not None:
            outputs = dataclasses.replace(outputs, base_scores=image_score(outputs.maps, variant.top_fraction).numpy())
        return self._rows(outputs, variant.align), time.perf_counter() - started

    def _rows(self, outputs: EvalOutputs, align_name: str) -> dict[str, dict]:
        """protocol -> metrics row."""
        rows = results_table(outputs, self.detector.settings.method, (align_name,))["rows"]
        return {row["protocol"]: row for row in rows}


def noisy_split(
    train: list[Sample], test: list[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Move `fraction` of each class's anomalous test images into the training set (as BTAD's noisy set does).

    The moved images leave the test set, so no image is both trained on and tested.
    """
    rng = np.random.default_rng(seed)
    moved: set[int] = set()
    for name in sorted({s.class_name for s in test}):
        anomalous = [i for i, s in enumerate(test) if s.class_name == name and s.label == 1]
        count = int(round(fraction * len(anomalous)))
        moved.update(rng.choice(anomalous, size=count, replace=False).tolist() if count else [])
    noisy_train = train + [dataclasses.replace(test[i], label=0) for i in sorted(moved)]
    return noisy_train, [s for i, s in enumerate(test) if i not in moved]


def format_rows(title: str, entries: list[tuple[str, dict, float | None]]) -> str:
    """A paper-shaped table: one line per variant, absolute-unified metrics in percent, and its time."""
    widths = {key: max(6, len(METRIC_HEADERS[key]) + 1) for key in ABLATION_METRICS}
    header = f"{'variant':<42} " + " ".join(f"{METRIC_HEADERS[k]:>{w}}" for k, w in widths.items()) + f" {'time':>7}"
    lines = [title, header, "-" * len(header)]
    for label, row, seconds in entries:
        cells = " ".join(
            f"{'-' if row.get(k) is None or np.isnan(row[k]) else f'{100 * row[k]:.1f}':>{w}}"
            for k, w in widths.items()
        )
        timing = "" if seconds is None else f"{seconds:6.1f}s"
        lines.append(f"{label:<42} {cells} {timing:>7}")
    return "\n".join(lines)
