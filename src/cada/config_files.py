"""Settings from files and the command line: a preset, then a YAML or JSON file (`read_config`; a run's
config.json is one), then named options, then `--set key=value` overrides (`parse_override`), each later one
winning, checked as every `Settings` is (`make_settings`). Beside config.py, which defines the settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cada.config import DEFAULT_METHOD, Settings
from cada.config import preset as make_preset
from cada.files import os_error, printable, shown

# The options of `make_settings` that the command line gives (argparse's names).
SETTING_OPTIONS = (
    "preset",
    "method",
    "config",
    "overrides",
    "align",
    "seed",
    "backbone",
    "image_size",
    "resize",
    "tile",
    "tile_overlap",
    "iters",
    "epochs",
    "align_iters",
    "scale_lr",
)


def read_config(path: str | Path) -> dict:
    """Settings (a mapping, possibly partial) from a YAML or JSON file; a run's config.json gives its "settings"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--config {printable(path)}: {os_error(error)}") from None
    import yaml

    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = yaml.load(text, Loader=_yaml_loader()) if is_yaml else json.loads(text)  # noqa: S506 - a safe loader
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"--config {printable(path)} is not valid {'YAML' if is_yaml else 'JSON'}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):  # a run's config.json
        data = data["settings"]
    if not isinstance(data, dict):
        raise ValueError(f"--config {printable(path)} must hold a mapping of settings, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'base.lr=1e-3' -> (['base', 'lr'], 0.001). The value is read as JSON (numbers, true/false, null, [lists]);
    anything else is a string, so a string needs no quotes."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise ValueError(f"--set takes dotted.key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().split("."), parsed


def _yaml_loader():
    """PyYAML's safe loader, reading 1e-3 as a number as JSON does (YAML 1.1 wants 1.0e-3)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):  # settings need no aliases, and nested ones expand exponentially
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a settings file", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)

    number = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")  # an exponent without a dot
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return Loader


def _merge(into: dict, changes: Mapping, prefix: str = "") -> None:
    """Nested update: a block given in `changes` changes only the fields it names."""
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{prefix}{key}.")
        elif isinstance(into.get(key), dict):
            raise ValueError(f"{prefix}{key} must be a mapping of settings, got {shown(value)}")
        else:
            into[key] = value


def make_settings(
    preset: str = "cpu",
    method: str | None = None,
    *,
    config: str | Path | Mapping | None = None,
    overrides: Iterable[str] = (),
    align: str | None = None,
    seed: int | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    resize: str | None = None,
    tile: int | None = None,
    tile_overlap: float | None = None,
    iters: int | None = None,
    epochs: float | None = None,
    align_iters: int | None = None,
    scale_lr: bool = False,
    default_method: str = DEFAULT_METHOD,
) -> Settings:
    """Validated settings: the preset of the method, then the `config` file (or mapping), then the named options,
    then `overrides` ("dotted.key=value", every setting reachable), each later one winning.

    `method` (default: the config's, else `default_method`) chooses the preset's schedule. `iters` or `epochs`
    replaces the preset's length, whichever way the preset gives it (`epochs`: exactly these passes, no minimum of
    steps). A bad key or value raises ValueError naming it, as `Settings.validate` does.
    """
    given = dict(read_config(config) if isinstance(config, (str, Path)) else (config or {}))
    method = method or given.get("method") or default_method
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {shown(method)}")
    data = make_preset(preset, method).to_dict()
    _merge(data, given)
    data["method"] = method
    named = {
        "align": align,
        "seed": seed,
        "backbone": backbone,
        "image_size": image_size,
        "resize": resize,
        "tile": tile,
        "tile_overlap": tile_overlap,
    }
    # `is not None`, not truthiness: 0 is a value to validate (and refuse), never "use the preset's".
    data.update({name: value for name, value in named.items() if value is not None})
    if iters is not None:
        data["base"].update(iters=iters, epochs=None)
    if epochs is not None:
        data["base"].update(iters=None, epochs=epochs, min_iters=0)
    if align_iters is not None:
        data["aligner"]["iters"] = align_iters
    if scale_lr:
        data["base"]["scale_lr"] = data["aligner"]["scale_lr"] = True
    for text in overrides:
        path, value = parse_override(text)
        block = data
        for depth, part in enumerate(path[:-1]):
            block = block.setdefault(part, {})  # a new name: refused below by from_dict, with the known ones
            if not isinstance(block, dict):
                raise ValueError(f"--set {text}: {'.'.join(path[: depth + 1])} is a value, not a block of settings")
        block[path[-1]] = value
    return Settings.from_dict(data)


def settings_from_options(options: Mapping, default_method: str = DEFAULT_METHOD) -> Settings:
    """`make_settings` from a mapping holding (some of) SETTING_OPTIONS, e.g. vars() of parsed arguments."""
    given = {key: options[key] for key in SETTING_OPTIONS if options.get(key) is not None}
    return make_settings(**given, default_method=default_method)
