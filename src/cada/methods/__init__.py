"""Base anomaly-detection methods, one module each."""

from __future__ import annotations

from cada.methods.base import BaseMethod, MethodOutput
from cada.methods.revdist import RevDist


def create_method(name: str, backbone: str, image_size: int, pretrained: bool = True,
                  weights_path: str | None = None) -> BaseMethod:
    if name == "revdist":
        return RevDist(backbone, image_size, pretrained=pretrained, weights_path=weights_path)
    raise ValueError(f"unknown method {name!r}; available: revdist")


__all__ = ["BaseMethod", "MethodOutput", "RevDist", "create_method"]
