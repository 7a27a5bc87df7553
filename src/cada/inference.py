"""The one inference path, shared by `Detector.infer` and the ONNX export (export.ExportedDetector)."""

from __future__ import annotations

import torch

from cada.data.dataset import normalize
from cada.scoring import smooth


def infer_maps(
    method, aligner, images: torch.Tensor, smoothing_sigma: float, class_names: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images B x 3 x S x S -> (smoothed base maps B x S x S, u B, spread = gamma - u kept from zero B, the
    align features the aligner read). `class_names` only for the class-aware reference aligner."""
    output = method(normalize(images))
    maps = smooth(output.anomaly_map, smoothing_sigma)
    u, gamma = aligner.stats(output.align_features, class_names)
    return maps, u, aligner.spread(u, gamma), output.align_features
