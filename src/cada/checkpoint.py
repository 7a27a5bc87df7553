"""A trained run is one folder: model.safetensors (all weights) + config.json (settings and statistics).

Nothing is ever unpickled: safetensors holds raw tensors, JSON holds the rest.

How a run is written, so that no work is ever lost:
- The complete run (weights and config) is written into a staging folder beside it (.RUN.new-XXXX) and only then
  put in place by renaming folders: weights and config are replaced together, never one without the other.
- An existing run is replaced only when asked (`overwrite`); it is renamed to .RUN.old-XXXX while the new one is
  renamed in, then removed. The checkpoint of an unfinished training (RUN/resume) lives in the folder being
  replaced, so it disappears only once the finished run is in place; a failed save keeps it.
- A run is a folder with both config.json (format "cada-run") and model.safetensors. Only a folder holding
  nothing but a run's own files (RUN_ENTRIES) is replaced: a folder with anything else in it (a user's files,
  evaluate's results, predictions), a symbolic link or any other folder never is.
- Before the first rename, the journal .RUN.swap.json names the two folders (fresh names, made by this swap). A
  kill midway leaves the journal; the next write to RUN finishes or undoes that swap, touching only the
  folders the journal names. Folders of the user's, whatever their names, are never touched.
- One writer at a time: the sibling lock file .RUN.lock (see `cada.files.folder_lock`). A run's config alone
  (calibration) is updated atomically with `update_config`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cada.files import atomic_write, folder_lock, printable, write_json

RESUME_FOLDER = "resume"  # RUN/resume: the checkpoint of an unfinished training run
FORMAT = "cada-run"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOG_FILE = "train_log.csv"  # the per-step training log (cada.engine.log)
TENSORBOARD_FOLDER = "tensorboard"  # the same log as TensorBoard scalars, on request
# What a run folder may hold: `overwrite` replaces a folder only when it holds nothing else.
RUN_ENTRIES = frozenset({WEIGHTS_FILE, CONFIG_FILE, LOG_FILE, TENSORBOARD_FOLDER, RESUME_FOLDER})
SWAP_FORMAT = "cada-swap"


class IncompatibleRunError(ValueError):
    """The folder is not a cada run, or one written in a format this version cannot read."""


def _versions() -> dict:
    from cada import __version__

    return {"cada": __version__, "torch": torch.__version__}


def _sibling(folder: Path, what: str) -> Path:
    return folder.parent / f".{folder.name}.{what}"


def folder_state(folder: str | Path) -> str:
    """'absent', 'empty', 'unfinished' (only the checkpoint of an interrupted training), 'run' (config.json of a
    cada run and its weights), 'link' (a symbolic link), 'file' or 'other'."""
    folder = Path(folder)
    if folder.is_symlink():
        return "link"
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        return "file"
    names = {entry.name for entry in folder.iterdir()}
    if not names:
        return "empty"
    if names == {RESUME_FOLDER}:
        return "unfinished"
    if CONFIG_FILE in names and WEIGHTS_FILE in names:
        try:
            return "run" if json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT else "other"
        except (OSError, ValueError, AttributeError):
            return "other"
    return "other"


def check_replaceable(folder: str | Path, overwrite: bool, option: str = "the folder") -> str:
    """The folder's state, if a run may be written there; ValueError saying why not (and what to do) otherwise."""
    folder = Path(folder)
    state = folder_state(folder)
    name = printable(folder)
    if state == "link":
        raise ValueError(
            f"{option} {name} is a symbolic link (to {printable(os.readlink(folder))}): give the folder itself, "
            "or another folder"
        )
    if state == "file":
        raise ValueError(f"{option} {name} is a file, not a folder")
    if state == "other":
        raise ValueError(
            f"{option} {name} is not empty and is not a cada run: choose a new or empty folder "
            "(overwriting only ever replaces a cada run)"
        )
    if state == "run" and not overwrite:
        calibration = json.loads((folder / CONFIG_FILE).read_text()).get("calibration")
        threshold = f", calibrated: threshold {calibration['threshold']:.4f}" if calibration else ""
        raise ValueError(
            f"{option} {name} already holds a trained run{threshold}: choose another folder, or add "
            "--overwrite (Python: overwrite=True) to replace it once the new run is complete"
        )
    if state == "run":
        foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in RUN_ENTRIES)
        if foreign:
            shown = ", ".join(printable(entry) for entry in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"{option} {name} holds a run and {len(foreign)} other entr{'y' if len(foreign) == 1 else 'ies'} "
                f"({shown}) that --overwrite would delete: move them out of the folder, or choose another one"
            )
    return state


def _journal(folder: Path) -> Path:
    return _sibling(folder, "swap.json")


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def recover_swap(folder: str | Path) -> None:
    """Finish or undo a swap that a kill interrupted (see the module docstring): only the folders its journal names."""
    folder = Path(folder)
    journal = _journal(folder)
    if not journal.is_file():
        return
    try:
        entry = json.loads(journal.read_text())
        names = [entry["new"], entry["old"]]
        valid = entry["format"] == SWAP_FORMAT and all(
            isinstance(n, str) and n.startswith(f".{folder.name}.") and "/" not in n and os.sep not in n for n in names
        )
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ValueError(
            f"{printable(journal)} is not a swap journal cada wrote: remove it (nothing of yours is touched) "
            "and run the command again"
        )
    new, old = (folder.parent / name for name in names)
    if not os.path.lexists(folder):
        if _complete(new):
            os.rename(new, folder)  # the new run was complete (its config is written last): finish the swap
        elif old.is_dir():
            os.rename(old, folder)  # undo it
    for leftover in (new, old):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
    journal.unlink()


def _fresh_sibling(folder: Path, what: str) -> Path:
    """.RUN.WHAT-XXXXXXXX: a name nothing holds yet."""
    while True:
        candidate = _sibling(folder, f"{what}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically; a failure to write (a full disk) is an OSError, as for any other file."""
    try:
        atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    except SafetensorError as error:  # safetensors reports I/O errors as its own type
        raise OSError(f"could not write {printable(path)}: {error}") from None


def save_run(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the run (weights + config) to `folder` as one step; see the module docstring for the rules.
    `extra(staging_folder)` writes more of the run's files (the training log) before the config."""
    folder = Path(folder)
    with folder_lock(folder):
        recover_swap(folder)
        existing = check_replaceable(folder, overwrite)
        staging, old = _fresh_sibling(folder, "new"), _fresh_sibling(folder, "old")
        write_json(_journal(folder), {"format": SWAP_FORMAT, "new": staging.name, "old": old.name})
        try:
            staging.mkdir(parents=True)
            tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_tensors(tensors, staging / WEIGHTS_FILE)
            if extra is not None:
                extra(staging)
            write_json(
                staging / CONFIG_FILE,
                {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(), **config},
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _journal(folder).unlink(missing_ok=True)
            raise
        if existing == "absent":
            os.rename(staging, folder)
        else:
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old)
        _journal(folder).unlink()
    return folder


def update_config(folder: str | Path, **changes) -> dict:
    """Replace entries of a run's config.json (the weights stay), atomically; the previous config is returned."""
    with folder_lock(folder):
        config = read_run_config(folder)
        write_json(Path(folder) / CONFIG_FILE, {**config, **changes})
    return config


def read_run_config(folder: str | Path) -> dict:
    """A run folder's config.json, checked to be a cada run of this format version."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise IncompatibleRunError(
            f"{folder} is not a cada run: {CONFIG_FILE} is missing (train one with `cada train`)"
        )
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
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise IncompatibleRunError(
            f"{printable(path)} is not a readable safetensors file (truncated or damaged? "
            f"{error}): train the run again, or restore it from a copy"
        ) from None
