"""cada: absolute-unified multi-class visual anomaly detection with Class-Agnostic Distribution Alignment."""

__version__ = "0.1.0"

__all__ = ["Detector", "Prediction", "Settings", "preset", "__version__"]


def __getattr__(name):
    # Imported lazily so that `cada --help` and light submodules do not pay for torch and timm.
    if name in ("Detector", "Prediction"):
        from cada import api

        return getattr(api, name)
    if name in ("Settings", "preset"):
        from cada import config

        return getattr(config, name)
    raise AttributeError(f"module 'cada' has no attribute {name!r}")
