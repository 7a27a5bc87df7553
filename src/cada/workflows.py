"""The workflows behind the command line, usable from Python: settings from a preset, a config file and
overrides (`make_settings`), `train` a run folder, `evaluate` a run on a data set (-> the results dict that
`cada evaluate --json` writes). The CLI (cli.py) parses arguments and calls these.

>>> settings = make_settings("cpu", "revdist", overrides=["base.iters=200"])   # doctest: +SKIP
>>> detector = train(settings, "data/mvtec", "runs/one")                      # doctest: +SKIP
>>> results = evaluate("runs/one", "data/mvtec")                               # doctest: +SKIP

What they have to say (the schedule, the tables) goes to the "cada" logger at INFO; `cada` shows it on the console.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cada.config import DEFAULT_METHOD, Settings
from cada.config import preset as make_preset
from cada.files import check_output, folder_lock, os_error, printable, shown, write_json
from cada.threshold import check_fpr

log = logging.getLogger(__name__)
LOGGERS = ("csv", "tensorboard")  # the training log: the CSV always, TensorBoard scalars as well on request
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


def run_files(run: str | Path) -> list[Path]:
    """What no output may be written over: a run's weights, settings and checkpoint."""
    from cada.checkpoint import CONFIG_FILE, RESUME_FOLDER, WEIGHTS_FILE

    return [Path(run) / name for name in (WEIGHTS_FILE, CONFIG_FILE, RESUME_FOLDER)]


def find_split(root, split: str, format: str = "auto", quiet: bool = False):
    """The samples of `split` ("train"/"test") of the data root, its layout recognised (and said) with "auto"."""
    from cada.data.layouts import find_samples

    found, chosen = find_samples(root, split, format)
    if format == "auto" and not quiet:
        log.info("data layout of %s: %s", root, chosen)
    return found


def describe_calibration(calibration: dict) -> str:
    how = (
        f"at false-positive rate {calibration['target_fpr']}"
        if calibration["how"] == "fpr"
        else "F1-optimal on labelled validation images"
    )
    return (
        f"threshold {calibration['threshold']:.4f} (aligned score; base map {calibration['base_threshold']:.4f}) "
        f"chosen {how} from {calibration['source']}"
    )


def train(
    settings: Settings,
    data: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    progress: bool = True,
    holdout: float = 0.0,
    fpr: float = 0.01,
    format: str = "auto",
    cache_dir="auto",
    checkpoint_every: int | None = None,
    resume: bool = False,
    resume_hint: str = "",
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    logger: str = "csv",
):
    """Train and save the run in `out` (rank 0 writes it, holding the folder's lock throughout); the Detector.
    `device`, `precision`: where and how the networks run (cada.engine.device). `logger`: "csv" saves the
    per-step training log as RUN/train_log.csv, "tensorboard" also as TensorBoard scalars (cada.engine.log).

    With `checkpoint_every` (0: only on interrupt), checkpoints go to out/resume and `resume` continues from them.
    An existing run in `out` is replaced only with `overwrite`, and only once the new one is complete."""
    import torch

    from cada.api import Detector
    from cada.checkpoint import RESUME_FOLDER, check_replaceable, recover_swap
    from cada.engine.device import device_name
    from cada.engine.distributed import is_main, rank, world_size
    from cada.engine.resume import STATE_TENSORS, require_checkpoint

    data, out = Path(data), Path(out)
    if holdout:
        check_fpr(fpr, "--fpr")  # before the training, not after
    if logger not in LOGGERS:
        raise ValueError(f"--logger must be one of {', '.join(LOGGERS)}, got {logger!r}")
    if logger == "tensorboard":
        from cada.engine.log import require_tensorboard

        require_tensorboard()  # before the slow part
    check_output(out, "--out", "folder", inputs=[data])
    with folder_lock(out) if is_main() else nullcontext():
        if is_main():
            recover_swap(out)
        state = check_replaceable(out, overwrite, "--out")
        checkpoint_folder = out / RESUME_FOLDER
        if resume:
            require_checkpoint(checkpoint_folder)  # before the slow part
        elif state == "unfinished" and not overwrite:
            raise ValueError(
                f"--out {printable(out)} holds an unfinished training ({printable(checkpoint_folder)})"
                ": continue it with --resume, or start again with --overwrite"
            )
        elif checkpoint_folder.exists() and is_main():
            shutil.rmtree(checkpoint_folder)  # --overwrite without --resume: an earlier training's checkpoint
        detector = Detector(settings, weights_path=weights, device=device, precision=precision)
        log.debug("settings: %s", json.dumps(settings.to_dict(), sort_keys=True))
        log.debug("torch threads: %d, process %d of %d", torch.get_num_threads(), rank() + 1, world_size())
        processes = f" in {world_size()} processes" if world_size() > 1 else ""

        def announce(n_images: int, iters: int) -> None:  # once the images are read: the schedule is resolved
            batch = settings.base.batch_size * world_size()
            schedule = (
                "one pass, no iterations"
                if not detector.method.trains_by_gradient()
                else f"{iters} iters of batch {batch} = {settings.base.passes(n_images, world_size()):.1f} passes "
                f"over {n_images} {'tiles' if settings.tile > 1 else 'images'}"
            )
            fitting = ", letterboxed" if settings.resize == "letterbox" else ""
            if settings.tile > 1:
                fitting += f", {settings.tile}x{settings.tile} tiles of {settings.input_size}px images"
            log.info(
                f"training {settings.method} ({settings.backbone}, {settings.image_size}px{fitting}, {schedule}) "
                f"+ aligner {settings.align} on all classes of {data} mixed{processes}, on "
                f"{device_name(detector.device)} in {detector.precision_name}"
            )

        checkpoint_dir = None if checkpoint_every is None and not resume else checkpoint_folder
        # The checkpoint stays until the run is saved: the save replaces the folder that holds it.
        detector.fit(
            data,
            progress=progress,
            holdout=holdout,
            fpr=fpr,
            format=format,
            cache_dir=cache_dir,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every or 0,
            resume=resume,
            resume_hint=resume_hint,
            keep_checkpoint=True,
            on_start=announce,
        )
        info = detector.training_info
        log.info(f"  data layout: {info['format']}")
        log.info(
            f"  {info['n_images']} training images of {len(info['classes'])} classes; base "
            f"{info['base_seconds']} s, aligner {info['aligner_seconds']} s"
            + (
                ""
                if info["peak_device_memory_gib"] is None
                else f"; peak GPU memory {info['peak_device_memory_gib']} GiB"
            )
        )
        if detector.calibration:
            log.info(describe_calibration(detector.calibration))
        if is_main():
            try:
                detector.save(out, overwrite=overwrite, tensorboard=logger == "tensorboard")
            except OSError as error:
                kept = (
                    f"the training checkpoint is kept in {printable(checkpoint_folder)}: once that is fixed, "
                    f"finish with `{resume_hint or 'the same command'} --resume`"
                    if (checkpoint_folder / STATE_TENSORS).is_file()
                    else "nothing was kept: train again"
                )
                raise ValueError(f"could not write the run to {printable(out)} ({os_error(error)}); {kept}") from error
        log.info(f"saved run to {out}")
        return detector


def evaluate(
    detector,
    data: str | Path,
    json_path: str | Path | None = None,
    *,
    progress: bool = True,
    plots_dir: str | Path | None = None,
    samples=None,
    cache_dir="auto",
    report_dir: str | Path | None = None,
    pixel_resolution: str = "model",
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Evaluate a Detector (or a run folder) on the test split of `data` (or on `samples`): the results dict
    (`cada evaluate --json`), its tables logged; JSON, plots and report written when asked."""
    from cada.api import Detector
    from cada.data.duplicates import warn_duplicates
    from cada.engine.device import device_name
    from cada.engine.distributed import is_main, world_size
    from cada.evaluate import (
        collect,
        detector_results,
        format_calibration_check,
        format_decisions,
        format_per_class,
        format_per_product,
        format_table,
    )

    if isinstance(detector, (str, Path)):
        detector = Detector.load(detector, device=device, precision=precision)
    data = Path(data)
    json_path, plots_dir, report_dir = (None if p is None else Path(p) for p in (json_path, plots_dir, report_dir))
    if report_dir and world_size() > 1:
        raise ValueError(
            "--report shows every image's map, which stay with their process under torchrun: write "
            "the report from a single-process `cada evaluate`"
        )
    if samples is None:
        samples = find_split(data, "test", quiet=not is_main())
    for label, kind, where in ((0, "normal", "test/good"), (1, "anomalous", "test/<defect>")):
        if not any(sample.label == label for sample in samples):
            raise ValueError(
                f"the {len(samples)} test images of {printable(data)} hold no {kind} image ({where}): the metrics "
                "compare normal with anomalous images, so evaluation needs both"
            )
    trained_on = detector.training_info.get("data")
    if trained_on and Path(trained_on).is_dir() and is_main():
        try:
            warn_duplicates(
                find_split(trained_on, "train", detector.training_info.get("format", "auto"), quiet=True), samples
            )
        except (FileNotFoundError, ValueError):
            pass  # the training data moved or changed layout: nothing to compare with
    started = time.perf_counter()
    outputs = collect(detector, samples, progress=progress, cache_dir=cache_dir, pixel_resolution=pixel_resolution)
    results = detector_results(detector, outputs)
    results["meta"] = {
        "data": printable(data),
        "n_test_images": len(outputs.samples),
        "backbone": detector.settings.backbone,
        "image_size": detector.settings.image_size,
        "resize": detector.settings.resize,
        "pixel_resolution": pixel_resolution,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
        "device": device_name(detector.device),
        "precision": detector.precision_name,
    }
    if world_size() > 1:
        results["meta"]["processes"] = world_size()
    if not is_main():  # every process computed the same results; rank 0 reports them
        return results
    say = log.info
    say(format_table(results))
    say("per class:")
    say(format_per_class(results))
    if detector.calibration:
        say(f"at the stored threshold ({detector.calibration['how']}, {detector.calibration['source']}):")
        say(format_decisions(results))
        for line in format_calibration_check(results):
            say(line)
    say("per product, at one pooled threshold (oracle: each product's training z-score, class names known):")
    say(format_per_product(results))
    figures = []  # (title, PNG) for the report
    if plots_dir or report_dir:
        from cada.report.plots import loss_curves, score_distributions

        folder = plots_dir or report_dir
        assert folder is not None
        figure = score_distributions(outputs, folder / "score_distributions.png", detector.settings.align)
        say(f"wrote {figure}")
        figures.append(("Image scores per class", figure))
        if detector.training_log:
            figure = loss_curves(detector.training_log, folder / "loss_curves.png")
            say(f"wrote {figure}")
            figures.append(("Training loss", figure))
    if report_dir:
        from cada.report.html import write_report

        say(f"wrote {write_report(report_dir, results, outputs, detector, figures)}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, results)
        say(f"wrote {json_path}")
    return results
