"""The two protocols on hand-made scores where the right answer is known."""

import json

import numpy as np
import pytest
import torch

from cada.data.mvtec import Sample
from cada.evaluate import EvalOutputs, format_table, results_table


def _outputs(offsets, per_class=40, size=8, seed=0):
    """Each class separates normal from anomalous perfectly, but its scores sit at its own offset."""
    rng = np.random.default_rng(seed)
    samples, maps, masks = [], [], []
    for class_index, offset in enumerate(offsets):
        for i in range(per_class):
            label = i % 2
            samples.append(Sample(f"{class_index}/{i}.png", label, f"class{class_index}"))
            image_map = offset + rng.uniform(0, 0.1, (size, size))
            mask = np.zeros((size, size), bool)
            if label:
                mask[:2, :2] = True
                image_map[mask] += 0.5
            maps.append(image_map)
            masks.append(mask)
    maps = torch.tensor(np.stack(maps), dtype=torch.float32)
    scores = maps.flatten(1).amax(dim=1).numpy()
    n = len(samples)
    u = np.repeat(np.asarray(offsets, np.float32), per_class)
    return EvalOutputs(samples, maps, torch.tensor(np.stack(masks)), np.ones(n, bool), scores, u, np.ones(n, np.float32))


def test_absolute_unified_suffers_from_class_offsets_and_alignment_fixes_it():
    outputs = _outputs([0.0, 0.3, 0.6])
    results = results_table(outputs, "revdist", ("none", "cada"))
    rows = {(r["align"], r["protocol"]): r for r in results["rows"]}
    # Per class everything separates: model-unified is perfect with or without alignment.
    assert rows[("none", "model-unified")]["i_auroc"] == pytest.approx(1.0)
    assert rows[("none", "model-unified")]["p_auroc"] == pytest.approx(1.0)
    # Pooled, a high-offset class's normals outscore a low-offset class's defects.
    assert rows[("none", "absolute-unified")]["i_auroc"] < 0.9
    # Subtracting each image's true class offset (u) puts all classes on one scale again.
    assert rows[("cada", "absolute-unified")]["i_auroc"] == pytest.approx(1.0)
    assert rows[("cada", "absolute-unified")]["p_auroc"] == pytest.approx(1.0)
    assert set(results["per_class"]["none"]) == {"class0", "class1", "class2"}
    json.dumps(results, allow_nan=False)  # the JSON other tools read has no NaN
    assert "absolute-unified" in format_table(results)


def test_model_unified_is_the_mean_of_per_class_figures():
    outputs = _outputs([0.0, 0.2])
    outputs.base_scores[:3] = [0.9, 0.0, 0.9]  # spoil class0 a little
    results = results_table(outputs, "revdist", ("none",))
    per_class = results["per_class"]["none"]
    model_unified = [r for r in results["rows"] if r["protocol"] == "model-unified"][0]
    expected = np.mean([per_class["class0"]["i_auroc"], per_class["class1"]["i_auroc"]])
    assert model_unified["i_auroc"] == pytest.approx(expected)
    assert per_class["class0"]["i_auroc"] < 1.0


def test_class_without_anomalous_images_gives_none_not_a_crash():
    outputs = _outputs([0.0, 0.3])
    keep = [i for i, s in enumerate(outputs.samples) if not (s.class_name == "class1" and s.label == 1)]
    outputs = EvalOutputs([outputs.samples[i] for i in keep], outputs.maps[keep], outputs.masks[keep],
                          outputs.has_mask[keep], outputs.base_scores[keep], outputs.u[keep], outputs.spread[keep])
    results = results_table(outputs, "revdist", ("none",))
    assert results["per_class"]["none"]["class1"]["i_auroc"] is None
    model_unified = [r for r in results["rows"] if r["protocol"] == "model-unified"][0]
    assert model_unified["i_auroc"] == pytest.approx(results["per_class"]["none"]["class0"]["i_auroc"])
