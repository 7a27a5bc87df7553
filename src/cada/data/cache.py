"""On-disk cache of decoded, resized images and masks, so that a second run over the same data skips decoding.

An entry is one .npy file (uint8, 4 x S x S: RGB and the 0/1 mask) named by a hash of the image's and the
mask's file bytes, the target size and LOADER_VERSION. Hashing the bytes costs a read but no decode (the
decode is what is slow), and it makes the key follow the content: an edited file gets a new entry, a
renamed or copied one reuses the old. Entries are written to a temporary file and renamed into place, so
concurrent runs never see half an entry; an entry that does not load back as expected is decoded again.
Nothing is ever pickled. Old entries are not evicted: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

# Bump when decoding, resizing or the entry format changes, so that no old entry is reused.
# 2: NaN/inf float pixels and 32-bit values beyond 0-65535 are refused, not cached as decoded; 3: one resize rule
# (cada.data.resize: one axis at a time), whatever the installed Pillow does with both axes at once
LOADER_VERSION = 3
ENV_VAR = "CADA_CACHE_DIR"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$CADA_CACHE_DIR, else $XDG_CACHE_HOME/cada, else ~/.cache/cada (read at call time, so tests can redirect it)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cada"


def open_cache(cache_dir: str | Path | None) -> ImageCache | None:
    """'auto' -> the default folder; None -> no cache; else that folder."""
    if cache_dir is None:
        return None
    return ImageCache(default_cache_dir() if cache_dir == "auto" else cache_dir)


class ImageCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._warned = False

    def key(self, files: list[Path | None], settings: str) -> str:
        """Hash of the files' bytes (None: no file) and the settings; OSError when a file cannot be read."""
        digest = hashlib.blake2b(f"v{LOADER_VERSION}|{settings}".encode(), digest_size=20)
        for path in files:
            if path is None:
                digest.update(b"\0")
                continue
            digest.update(b"\1")
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
            digest.update(b"\2")  # end of this file: ("ab", "c") and ("a", "bc") differ
        return digest.hexdigest()

    def _entry(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"  # 256 subfolders keep directory listings short

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The stored array, or None when absent or unusable (truncated, foreign, wrong shape or type)."""
        try:
            array = np.load(self._entry(key), allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None  # corrupt: the caller decodes again and `put` replaces it
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.shape != shape:
            return None
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        """Store atomically; a cache that cannot be written is reported once and the run goes on without it."""
        entry = self._entry(key)
        temporary = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".tmp")
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(temporary, entry)
        except OSError as error:
            if temporary and os.path.exists(temporary):
                os.unlink(temporary)
            if not self._warned:
                self._warned = True
                warnings.warn(f"image cache {self.folder} cannot be written ({error}); going on without caching")
