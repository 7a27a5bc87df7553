"""Writing files without losing anything: atomic writes, checks of output paths before the slow work, one writer
per run folder, and file names that may not be valid UTF-8.

Every file cada writes goes through `atomic_write`: the content goes to a temporary file in the same folder,
which is renamed over the target only when complete, so a crash or a full disk never leaves half a file (and no
temporary file is left behind on an error).
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, for the permissions of the files written


def os_error(error: OSError) -> str:
    """'Permission denied: PATH' rather than '[Errno 13] Permission denied: 'PATH''; our own messages as they are."""
    if error.strerror and error.filename:
        return f"{error.strerror}: {printable(error.filename)}"
    return str(error)


def printable(text: str | Path) -> str:
    """`text` safe to write as UTF-8: bytes of a file name that are not valid UTF-8 (which Python keeps as
    surrogate escapes) are written as backslash escapes, e.g. b'\\xff' -> '\\xff'."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 80, 80, 6, 6, 2


def shown(value, limit: int = 120) -> str:
    """`repr(value)` cut short: a message names a bad value in one readable line, however large the value."""
    text = printable(_SHORT.repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `content` (text: as UTF-8, with `printable`'s escapes; bytes; or a function that writes the file at
    the path it is given) to a temporary file beside `path`, then rename it over `path`. On any error the temporary
    file is removed."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # as a plainly created file (mkstemp makes it private)
        if callable(content):
            content(temporary)
        elif isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(printable(content), encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: dict) -> Path:
    """Indented JSON, strict (no NaN), written atomically."""
    return atomic_write(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


# -- output paths: checked before the slow work ---------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path, option: str, target: Path) -> None:
    """The nearest existing folder on the way to `target` must be a folder we can create files in."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"{option} {printable(target)}: {printable(existing)} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # the one reliable test (os.access ignores read-only mounts)
    except OSError as error:
        raise ValueError(
            f"{option} {printable(target)}: cannot write in {printable(existing)} ({error.strerror or error})"
        ) from None


def check_output(
    path: str | Path,
    option: str,
    kind: str = "file",
    inputs: Iterable[str | Path] = (),
    protected: Iterable[str | Path] = (),
    overwrite: bool = True,
) -> Path:
    """Refuse, before any work, an output path that cada could not write or that would overwrite what it reads.

    `kind` is "file" or "folder"; `inputs` are the paths the command reads (data folders, image files): an
    output may not be one, lie inside one, or (a folder) contain one. `protected` are files that must not be
    written over (a run's weights and settings): an output may not be one or (a folder) contain one. Without
    `overwrite`, an existing file (or a non-empty folder) is a user's earlier output and is refused too.
    """
    path = Path(path)
    resolved = path.resolve()
    if kind == "file" and path.is_dir():
        raise ValueError(f"{option} {printable(path)} is a folder: give a file name")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {printable(path)} is a file: give a folder")
    for source in inputs:
        source = Path(source).resolve()
        if _inside(resolved, source) or (kind == "folder" and _inside(source, resolved)):
            relation = "is" if resolved == source else "lies inside" if _inside(resolved, source) else "contains"
            raise ValueError(
                f"{option} {printable(path)} {relation} the input {printable(source)}: "
                "cada never writes where it reads; choose another place"
            )
    for kept in protected:
        kept = Path(kept).resolve()
        if resolved == kept or (kind == "folder" and _inside(kept, resolved)) or _inside(resolved, kept):
            raise ValueError(f"{option} {printable(path)} would overwrite {printable(kept)}: choose another place")
    if not overwrite and (path.is_file() or (path.is_dir() and any(path.iterdir()))):
        raise ValueError(
            f"{option} {printable(path)} {'exists' if kind == 'file' else 'is not empty'}: choose "
            "another place, or add --overwrite to replace it"
        )
    _writable(path if kind == "folder" else path.parent, option, path)
    return path


# -- one writer per run folder --------------------------------------------------------------------------------

_HELD: set[Path] = set()  # folders this process holds the lock of (so a nested writer does not lock itself out)


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold FOLDER's lock (the sibling file .FOLDER.lock, created exclusively, holding our pid) while the block
    runs. Another live process holding it: ValueError naming it. A lock left by a process that no longer runs
    is taken over with a note."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        yield lock_path(folder)
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise ValueError(
                    f"{printable(folder)} is being written by another cada process (pid {owner}): wait "
                    f"for it to finish, or remove {printable(path)} if no such process runs"
                ) from None
            if attempt:
                raise ValueError(f"cannot take the lock {printable(path)}: remove it if no cada process runs") from None
            log.warning(f"taking over the lock {printable(path)} left by process {owner or '?'}, which no longer runs")
            path.unlink(missing_ok=True)
    os.write(handle, f"{os.getpid()}\n".encode())
    os.close(handle)
    _HELD.add(folder)
    try:
        yield path
    finally:
        _HELD.discard(folder)
        path.unlink(missing_ok=True)
