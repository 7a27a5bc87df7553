"""The same image in the training and the test split: a test that is no test."""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from cada.data.mvtec import Sample


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # unreadable: the loader reports it


def _digest(path: Path, known: dict[Path, str]) -> str:
    if path not in known:
        known[path] = hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()
    return known[path]


def find_duplicates(train: Sequence[Sample], test: Sequence[Sample]) -> list[tuple[Path, Path]]:
    """(train path, test path) for every test file byte-identical to a training file.

    Only files whose sizes collide are read, so a clean split costs one stat per file. Copies re-encoded
    to another format or resized are not caught.
    """
    by_size: dict[int, list[Path]] = defaultdict(list)
    for sample in train:
        size = _size(Path(sample.path))
        if size is not None:
            by_size[size].append(Path(sample.path))
    digests: dict[Path, str] = {}
    pairs = []
    for sample in test:
        path = Path(sample.path)
        size = _size(path)
        candidates = by_size.get(size, []) if size is not None else []
        try:
            pairs += [(other, path) for other in candidates if _digest(other, digests) == _digest(path, digests)]
        except OSError:
            continue
    return pairs


def warn_duplicates(train: Sequence[Sample], test: Sequence[Sample]) -> list[tuple[Path, Path]]:
    """find_duplicates, with a warning naming an example when there are any."""
    pairs = find_duplicates(train, test)
    if pairs:
        first_train, first_test = pairs[0]
        warnings.warn(
            f"{len({t for _, t in pairs})} test image(s) are identical to training images (e.g. {first_test} = "
            f"{first_train}); the detector has seen them, so the results on them overstate its quality"
        )
    return pairs
