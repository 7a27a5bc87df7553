"""A trained run is one folder: model.safetensors (all weights) + config.json (settings and statistics).

Nothing is ever unpickled: safetensors holds raw tensors, JSON holds the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "cada-run"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class IncompatibleRunError(ValueError):
    """The folder is not a cada run, or one written in a format this version cannot read."""


def _versions() -> dict:
    from cada import __version__

    return {"cada": __version__, "torch": torch.__version__}


def write_json(path: Path, data: dict) -> None:
    """Write via a temporary file and rename, so an interrupted write never leaves a half file behind."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def save_run(folder: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    temporary = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, folder / WEIGHTS_FILE)
    write_json(folder / CONFIG_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(), **config})
    return folder


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise IncompatibleRunError(f"{folder} is not a cada run: {CONFIG_FILE} is missing (train one with `cada train`)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise IncompatibleRunError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("format") != FORMAT:
        raise IncompatibleRunError(f"{config_path} is not a cada run configuration (format {config.get('format')!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        written_by = config.get("versions", {}).get("cada", "unknown")
        raise IncompatibleRunError(
            f"{folder} was written in run format {version} (cada {written_by}); this cada reads format "
            f"{FORMAT_VERSION}. Retrain the run with this version, or load it with cada {written_by}."
        )
    return config


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise IncompatibleRunError(f"{path} is missing: the run folder is incomplete")
    return load_file(str(path))
