"""Base anomaly-detection methods, one module each.

Each method registers itself (`@METHODS.register(name, options=..., presets=...)`, see `cada.registry`) with its
options dataclass (the `Settings` block of its name) and its preset hooks. The import order below is the order
the methods are listed in."""

from __future__ import annotations

from cada.methods.base import BaseMethod, MethodOutput
from cada.methods.cfa import CFA
from cada.methods.dinomaly import Dinomaly
from cada.methods.draem import DRAEM
from cada.methods.patchcore import PatchCore
from cada.methods.recontrast import ReContrast
from cada.methods.revdist import RevDist  # noqa: I001 - registration order
from cada.methods.revdist_patchcore import RevDistPatchCore
from cada.methods.uniad import UniAD
from cada.registry import METHODS


def create_method(
    name: str, backbone: str, image_size: int, pretrained: bool = True, weights_path: str | None = None, **options
) -> BaseMethod:
    """The method `name`; `options` are the fields of its options block (Settings.method_options())."""
    return METHODS[name].cls(backbone, image_size, pretrained=pretrained, weights_path=weights_path, **options)


__all__ = [
    "BaseMethod",
    "CFA",
    "DRAEM",
    "Dinomaly",
    "METHODS",
    "MethodOutput",
    "PatchCore",
    "ReContrast",
    "RevDist",
    "RevDistPatchCore",
    "UniAD",
    "create_method",
]
