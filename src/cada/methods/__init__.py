"""Base anomaly-detection methods, one module each."""

from __future__ import annotations

from cada.methods.base import BaseMethod, MethodOutput
from cada.methods.cfa import CFA
from cada.methods.draem import DRAEM
from cada.methods.patchcore import PatchCore
from cada.methods.recontrast import ReContrast
from cada.methods.revdist import RevDist
from cada.methods.uniad import UniAD

METHOD_CLASSES: dict[str, type[BaseMethod]] = {"revdist": RevDist, "recontrast": ReContrast, "uniad": UniAD,
                                               "patchcore": PatchCore, "draem": DRAEM, "cfa": CFA}


def create_method(name: str, backbone: str, image_size: int, pretrained: bool = True,
                  weights_path: str | None = None, **options) -> BaseMethod:
    """The method `name`; `options` are its own constructor options (Settings.method_options())."""
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](backbone, image_size, pretrained=pretrained, weights_path=weights_path, **options)


__all__ = ["BaseMethod", "CFA", "DRAEM", "METHOD_CLASSES", "MethodOutput", "PatchCore", "ReContrast", "RevDist",
           "UniAD", "create_method"]
