"""The one inference path, shared by `Detector.infer` and the ONNX export (export.ExportedDetector)."""

from __future__ import annotations

import torch

from cada.data.dataset import normalize
from cada.engine.device import autocast, module_device
from cada.scoring import smooth


def infer_maps(
    method,
    aligner,
    images: torch.Tensor,
    smoothing_sigma: float,
    class_names: list[str] | None = None,
    precision: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images B x 3 x S x S -> (smoothed base maps B x S x S, u B, spread = gamma - u kept from zero B, the
    align features the aligner read), on the method's device. The method's forward pass runs under autocast to
    `precision` (None: float32); its outputs, the smoothing and the aligner are float32. `class_names` only for
    the class-aware reference aligner."""
    device = module_device(method)
    with autocast(device, precision):
        output = method(normalize(images, device))
    maps = smooth(output.anomaly_map.float(), smoothing_sigma)
    features = output.align_features.float()
    u, gamma = aligner.stats(features, class_names)
    return maps, u, aligner.spread(u, gamma), features
