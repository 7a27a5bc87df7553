"""One registry per kind (methods, aligners, data layouts): a class registers itself by name with a decorator, so
adding one is one file. Names are listed in registration order. The built-in modules are imported on first use, then the
plugins: files or modules named in $CADA_PLUGINS (separated by os.pathsep) and the entry points of the group
"cada.plugins"; a plugin registers its classes by importing the decorator (see docs/architecture.md)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cada.files import shown

PLUGINS_ENV = "CADA_PLUGINS"
ENTRY_POINT_GROUP = "cada.plugins"

_loaded_plugins: set[str] = set()
_entry_points_loaded = False


def load_plugins() -> None:
    """Import every plugin not imported yet (read again on each call, so a later change of $CADA_PLUGINS counts)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            point.load()
    for item in filter(None, os.environ.get(PLUGINS_ENV, "").split(os.pathsep)):
        if item in _loaded_plugins:
            continue
        _loaded_plugins.add(item)  # before importing: a plugin that fails is reported once, not on every lookup
        if item.endswith(".py"):
            path = Path(item)
            if not path.is_file():
                raise ValueError(f"${PLUGINS_ENV} names {item}, which is not a file")
            name = f"cada_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ValueError(f"${PLUGINS_ENV} names {item}, which Python cannot import")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)


@dataclass
class Entry:
    """One registered class: its name, the class, its options dataclass (a `Settings` block of that name, given to
    the constructor as keywords; None: no options) and its preset hooks ({"paper": f, "cpu": f}, see
    `cada.config.preset`). `extra` holds what a kind adds (aligners: `trained`)."""

    name: str
    cls: type
    options: type | None = None
    presets: dict[str, Callable] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Registered classes of one kind by name; `package` is imported (registering the built-ins) on first use."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._entries: dict[str, Entry] = {}
        self._imported = False

    def register(
        self, name: str, *, options: type | None = None, presets: dict[str, Callable] | None = None, **extra
    ) -> Callable[[type], type]:
        """Class decorator: register the class under `name` (and set its `name` attribute)."""

        def decorate(cls: type) -> type:
            known = self._entries.get(name)
            if known is not None and known.cls.__qualname__ != cls.__qualname__:
                raise ValueError(
                    f"the {self.kind} name {name!r} is taken by {known.cls.__module__}.{known.cls.__name__}"
                )
            cls.name = name  # type: ignore[attr-defined]  # every registered base class declares it
            self._entries[name] = Entry(name, cls, options, dict(presets or {}), extra)
            return cls

        return decorate

    def _all(self) -> dict[str, Entry]:
        if not self._imported:
            self._imported = True
            importlib.import_module(self.package)
        load_plugins()
        return self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __getitem__(self, name: str) -> Entry:
        entries = self._all()
        if name not in entries:
            raise ValueError(f"unknown {self.kind} {shown(name)}; choose one of {', '.join(entries)}")
        return entries[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"


METHODS = Registry("method", "cada.methods")
ALIGNERS = Registry("aligner", "cada.align")
LAYOUTS = Registry("layout", "cada.data")
