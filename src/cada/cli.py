"""The command-line front: `cada demo | synth | train | evaluate`."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from safetensors import SafetensorError

from cada.config import ALIGNERS, METHODS, Settings, preset
from cada.files import check_output, folder_lock, printable, write_json


def _os_error(error: OSError) -> str:
    """'Permission denied: PATH' rather than '[Errno 13] Permission denied: 'PATH''; our own messages as they are."""
    if error.strerror and error.filename:
        return f"{error.strerror}: {printable(error.filename)}"
    return str(error)


def _settings_from_args(args):
    settings = preset(args.preset, args.method)  # each method has its own schedule (optimiser, iterations, size)
    settings.align = args.align
    settings.seed = args.seed
    # `is not None`, not truthiness: 0 is a value to validate (and refuse), never "use the preset's".
    if args.backbone is not None:
        settings.backbone = args.backbone
    if args.image_size is not None:
        settings.image_size = args.image_size
    if args.iters is not None:  # either length replaces the preset's, whichever way the preset gives it
        settings.base.iters, settings.base.epochs = args.iters, None
    if args.epochs is not None:  # exactly these passes: no preset minimum of steps
        settings.base.iters, settings.base.epochs, settings.base.min_iters = None, args.epochs, 0
    if args.align_iters is not None:
        settings.aligner.iters = args.align_iters
    if getattr(args, "scale_lr", False):
        settings.base.scale_lr = settings.aligner.scale_lr = True
    return settings.validate()


def _say(*args, **kwargs) -> None:
    """print on rank 0 only (every line once under torchrun)."""
    from cada.engine.distributed import is_main

    if is_main():
        print(*args, **kwargs)


def run_files(run: str | Path) -> list[Path]:
    """What no output may be written over: a run's weights, settings and checkpoint."""
    from cada.checkpoint import CONFIG_FILE, RESUME_FOLDER, WEIGHTS_FILE

    return [Path(run) / name for name in (WEIGHTS_FILE, CONFIG_FILE, RESUME_FOLDER)]


def train_and_save(settings, data: Path, out: Path, weights: str | None = None, progress: bool = True,
                   holdout: float = 0.0, fpr: float = 0.01, format: str = "auto", cache_dir="auto",
                   checkpoint_every: int | None = None, resume: bool = False, resume_hint: str = "",
                   overwrite: bool = False):
    """Train and save the run in `out` (rank 0 writes it, holding the folder's lock throughout). With
    `checkpoint_every` (0: only on interrupt), checkpoints go to out/resume and `resume` continues from them.
    An existing run in `out` is replaced only with `overwrite`, and only once the new one is complete."""
    from cada.api import Detector
    from cada.checkpoint import RESUME_FOLDER, check_replaceable, recover_swap
    from cada.engine.distributed import is_main, world_size
    from cada.engine.resume import STATE_TENSORS, require_checkpoint

    out = Path(out)
    check_output(out, "--out", "folder", inputs=[data])
    with folder_lock(out) if is_main() else nullcontext():
        if is_main():
            recover_swap(out)
        state = check_replaceable(out, overwrite, "--out")
        checkpoint_folder = out / RESUME_FOLDER
        if resume:
            require_checkpoint(checkpoint_folder)  # before the slow part
        elif state == "unfinished" and not overwrite:
            raise ValueError(f"--out {printable(out)} holds an unfinished training ({printable(checkpoint_folder)})"
                             ": continue it with --resume, or start again with --overwrite")
        elif checkpoint_folder.exists() and is_main():
            shutil.rmtree(checkpoint_folder)  # --overwrite without --resume: an earlier training's checkpoint
        detector = Detector(settings, weights_path=weights)
        processes = f" in {world_size()} processes" if world_size() > 1 else ""

        def announce(n_images: int, iters: int) -> None:  # once the images are read: the schedule is resolved
            batch = settings.base.batch_size * world_size()
            schedule = ("one pass, no iterations" if settings.method == "patchcore" else
                        f"{iters} iters of batch {batch} = {settings.base.passes(n_images, world_size()):.1f} passes "
                        f"over {n_images} images")
            _say(f"training {settings.method} ({settings.backbone}, {settings.image_size}px, {schedule}) "
                 f"+ aligner {settings.align} on all classes of {data} mixed{processes}")

        checkpoint_dir = None if checkpoint_every is None and not resume else checkpoint_folder
        # The checkpoint stays until the run is saved: the save replaces the folder that holds it.
        detector.fit(data, progress=progress, holdout=holdout, fpr=fpr, format=format, cache_dir=cache_dir,
                     checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every or 0, resume=resume,
                     resume_hint=resume_hint, keep_checkpoint=True, on_start=announce)
        info = detector.training_info
        _say(f"  data layout: {info['format']}")
        _say(f"  {info['n_images']} training images of {len(info['classes'])} classes; base "
             f"{info['base_seconds']} s, aligner {info['aligner_seconds']} s")
        if detector.calibration and is_main():
            _print_calibration(detector.calibration)
        if is_main():
            try:
                detector.save(out, overwrite=overwrite)
            except OSError as error:
                kept = (f"the training checkpoint is kept in {printable(checkpoint_folder)}: once that is fixed, "
                        f"finish with `{resume_hint or 'the same command'} --resume`"
                        if (checkpoint_folder / STATE_TENSORS).is_file() else "nothing was kept: train again")
                raise ValueError(f"could not write the run to {printable(out)} ({_os_error(error)}); {kept}") \
                    from error
        _say(f"saved run to {out}")
        return detector


def evaluate_and_report(detector, data: Path, json_path: Path | None, progress: bool = True,
                        plots_dir: Path | None = None, samples=None, cache_dir="auto",
                        report_dir: Path | None = None, pixel_resolution: str = "model") -> dict:
    """Evaluate on the test split of `data` (or on `samples`), print the tables, write JSON and plots."""
    from cada.data.duplicates import warn_duplicates
    from cada.evaluate import (collect, format_decisions, format_per_class, format_per_product, format_table,
                               results_table)
    from cada.engine.distributed import is_main, world_size

    if report_dir and world_size() > 1:
        raise ValueError("--report shows every image's map, which stay with their process under torchrun: write "
                         "the report from a single-process `cada evaluate`")
    if samples is None:
        samples = _samples(data, "test", quiet=not is_main())
    trained_on = detector.training_info.get("data")
    if trained_on and Path(trained_on).is_dir() and is_main():
        try:
            warn_duplicates(_samples(trained_on, "train", detector.training_info.get("format", "auto"), quiet=True),
                            samples)
        except (FileNotFoundError, ValueError):
            pass  # the training data moved or changed layout: nothing to compare with
    started = time.perf_counter()
    outputs = collect(detector, samples, progress=progress, cache_dir=cache_dir, pixel_resolution=pixel_resolution)
    aligners = ("none",) if detector.settings.align == "none" else ("none", detector.settings.align)
    results = results_table(outputs, detector.settings.method, aligners, detector.thresholds,
                            detector.training_info.get("class_score_stats"))
    results["meta"] = {
        "data": printable(data),
        "n_test_images": len(outputs.samples),
        "backbone": detector.settings.backbone,
        "image_size": detector.settings.image_size,
        "pixel_resolution": pixel_resolution,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
    }
    if world_size() > 1:
        results["meta"]["processes"] = world_size()
    if not is_main():  # every process computed the same results; rank 0 reports them
        return results
    print(format_table(results))
    print("per class:")
    print(format_per_class(results))
    if detector.calibration:
        print(f"at the stored threshold ({detector.calibration['how']}, {detector.calibration['source']}):")
        print(format_decisions(results))
    print("per product, at one pooled threshold (oracle: each product's training z-score, class names known):")
    print(format_per_product(results))
    figure = None
    if plots_dir or report_dir:
        from cada.report.plots import score_distributions

        figure = score_distributions(outputs.base_scores, outputs.u, outputs.spread, outputs.labels,
                                     outputs.class_names, (plots_dir or report_dir) / "score_distributions.png",
                                     detector.settings.align)
        print(f"wrote {figure}")
    if report_dir:
        from cada.report.html import write_report

        print(f"wrote {write_report(report_dir, results, outputs, detector, figure)}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, results)
        print(f"wrote {json_path}")
    return results


def _samples(root, split: str, format: str = "auto", quiet: bool = False):
    from cada.data.layouts import find_samples

    samples, chosen = find_samples(root, split, format)
    if format == "auto" and not quiet:
        print(f"data layout of {root}: {chosen}")
    return samples


def _cache_dir(args):
    return None if getattr(args, "no_cache", False) else "auto"


def cmd_synth(args) -> int:
    from cada.data.synthetic import generate_dataset

    root = generate_dataset(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                            n_test_defect=args.n_test_defect, image_size=args.image_size, seed=args.seed)
    print(f"wrote synthetic data set to {root}")
    return 0


def _without_devices(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            kept.append(arg)
    return kept


def launch_processes(devices: int, argv: list[str]) -> int:
    """`cada train --devices N ...`: the same command under torchrun (standalone rendezvous), N processes here."""
    import subprocess

    import torch

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "cada", *_without_devices(argv)]
    backend = "nccl for GPU tensors, gloo for CPU tensors" if torch.cuda.is_available() else "gloo (CPUs)"
    print(f"launching {devices} processes ({backend}): torchrun {' '.join(command[3:])}", flush=True)
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    process = subprocess.Popen(command, env=environment)
    # Ctrl-C reaches the training processes themselves (they checkpoint and stop); SIGTERM is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))}
    try:
        return process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def cmd_train(args) -> int:
    from cada.engine.distributed import init_distributed, world_size

    argv = list(getattr(args, "argv", None) or [])
    if args.devices is not None:
        if args.devices < 1:
            raise ValueError(f"--devices must be at least 1, got {args.devices}")
        if "RANK" in os.environ:
            raise ValueError("--devices launches torchrun itself: do not use it under torchrun")
        if args.devices > 1:
            return launch_processes(args.devices, argv)
    init_distributed()
    command = " ".join(shlex.quote(a) for a in _without_devices(argv) if a != "--resume")
    hint = f"torchrun --nproc_per_node={world_size()} -m cada {command}" if world_size() > 1 else f"cada {command}"
    train_and_save(_settings_from_args(args), Path(args.data), Path(args.out), args.weights, not args.quiet,
                   args.holdout, args.fpr, args.format, _cache_dir(args), args.checkpoint_every, args.resume, hint,
                   args.overwrite)
    return 0


def _print_calibration(calibration: dict) -> None:
    how = (f"at false-positive rate {calibration['target_fpr']}" if calibration["how"] == "fpr"
           else "F1-optimal on labelled validation images")
    print(f"threshold {calibration['threshold']:.4f} (aligned score; base map {calibration['base_threshold']:.4f}) "
          f"chosen {how} from {calibration['source']}")


def cmd_calibrate(args) -> int:
    from cada.api import Detector
    from cada.checkpoint import update_config
    from cada.data.dataset import load_all
    from cada.data.folder import folder_samples

    detector = Detector.load(args.run)
    previous = detector.calibration
    size = detector.settings.image_size
    if args.val:
        samples = _samples(args.val, "test", args.format)
        images, samples = load_all(samples, size, cache_dir=_cache_dir(args))
        detector.calibrate_f1(images, [s.label for s in samples], source=f"{len(samples)} labelled images of {args.val}")
    else:
        samples = folder_samples(normal=args.normal)
        images, samples = load_all(samples, size, cache_dir=_cache_dir(args))
        detector.calibrate(images, args.fpr, source=f"{len(samples)} normal images in {', '.join(args.normal)}")
    update_config(args.run, calibration=detector.calibration)  # the weights stay as they are
    _print_calibration(detector.calibration)
    if previous:
        print(f"replaced the previous threshold {previous['threshold']:.4f} ({previous['how']}, {previous['source']})")
    return 0


def cmd_export(args) -> int:
    from cada.api import Detector
    from cada.export import export_onnx, sidecar_path

    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise ValueError('ONNX export needs the onnx package: pip install -e ".[export]"') from None
    protected = run_files(args.run)
    check_output(args.out, "--out", "file", protected=protected, overwrite=args.overwrite)
    check_output(sidecar_path(args.out), "--out's sidecar", "file", protected=protected, overwrite=args.overwrite)
    out = export_onnx(Detector.load(args.run), args.out)
    print(f"wrote {out} and {sidecar_path(out)}")
    return 0


def cmd_predict(args) -> int:
    from cada.engine.distributed import init_distributed, is_main
    from cada.predict import detector_scorer, predict_paths

    init_distributed()  # under torchrun: the images are shared out over the processes, rank 0 writes the results

    target = Path(args.model)
    out = Path(args.out)
    _check_predict_out(out, target, args.paths, args.overwrite)
    if target.suffix == ".onnx":
        from cada.export import onnx_scorer

        scorer, image_size, threshold, description = onnx_scorer(target)
    else:
        from cada.api import Detector

        detector = Detector.load(target)
        scorer, image_size, threshold = detector_scorer(detector), detector.settings.image_size, detector.threshold
        description = {"run": str(target)}
        if hasattr(detector.aligner, "reference_distance"):  # an aligner with an unfamiliar-product signal (knn)
            description["unfamiliar_reference_distance"] = float(detector.aligner.reference_distance)
    if threshold is None and is_main():
        print("note: the run has no threshold yet (cada calibrate); scores only, no decisions", file=sys.stderr)
    summary = predict_paths(scorer, image_size, threshold, args.paths, args.out, args.overlays, args.masks,
                            args.batch_size, not args.quiet, description)
    if not is_main():
        return 0
    for message in summary["skipped"]:
        print(f"skipped: {message}", file=sys.stderr)
    if summary.get("n_unfamiliar"):
        print(f"{summary['n_unfamiliar']} images lie beyond every training image (column unfamiliar): likely a "
              "product the run was not trained on, whose scores mean little", file=sys.stderr)
    print(f"{summary['n_images']} images, {summary['n_anomalous']} anomalous, {len(summary['skipped'])} skipped; "
          f"{summary['images_per_second']} images/s; wrote {Path(args.out) / 'predictions.csv'}")
    return 0


def _check_predict_out(out: Path, model: Path, paths: list[str], overwrite: bool) -> None:
    """Before any scoring: OUT must not hold or overlap the inputs or the model, and earlier predictions there
    are replaced only with --overwrite (then their overlays and masks go, so old and new never mix)."""
    from cada.export import sidecar_path
    from cada.engine.distributed import is_distributed, is_main

    model_files = [model, sidecar_path(model)] if model.suffix == ".onnx" else run_files(model)
    check_output(out, "--out", "folder", inputs=paths, protected=model_files)
    earlier = [name for name in ("predictions.csv", "predictions.json", "overlays", "masks") if (out / name).exists()]
    if earlier and not overwrite:
        raise ValueError(f"--out {printable(out)} holds earlier predictions ({', '.join(earlier)}): choose another "
                         "folder, or add --overwrite to replace them")
    if earlier and is_main():
        for folder in ("overlays", "masks"):
            if (out / folder).is_dir():
                shutil.rmtree(out / folder)
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()  # no process writes before rank 0 has cleared the old overlays


def cmd_evaluate(args) -> int:
    from cada.api import Detector
    from cada.data.folder import folder_samples
    from cada.engine.distributed import init_distributed, is_main

    init_distributed()  # under torchrun: the test set is sharded over the processes, results on rank 0

    # The outputs are checked before the evaluation, which may take long.
    inputs = [args.data] if args.data else [*(args.normal or ()), *(args.anomalous or ()), *(args.masks or ())]
    for option, value, kind in (("--json", args.json, "file"), ("--plots", args.plots, "folder"),
                                ("--report", args.report, "folder")):
        if value:
            check_output(value, option, kind, inputs=inputs, protected=run_files(args.run), overwrite=args.overwrite)
    detector = Detector.load(args.run)
    if args.format == "folder":
        if not (args.normal and args.anomalous):
            raise ValueError("--format folder needs --normal DIR... and --anomalous DIR... (and optionally --masks)")
        samples = folder_samples(args.normal, args.anomalous, args.masks or ())
    else:
        if not args.data:
            raise ValueError("give --data ROOT, or --format folder with --normal/--anomalous folders")
        samples = _samples(args.data, "test", args.format, quiet=not is_main())
    evaluate_and_report(detector, Path(args.data or args.anomalous[0]), Path(args.json) if args.json else None,
                        not args.quiet, Path(args.plots) if args.plots else None, samples, _cache_dir(args),
                        Path(args.report) if args.report else None, args.pixel_resolution)
    return 0


def cmd_demo(args) -> int:
    from cada.data.synthetic import generate_dataset

    started = time.perf_counter()
    out = Path(args.out)
    check_output(out, "--out", "folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {printable(out)} is not empty (an earlier demo?): choose another folder, or add "
                         "--overwrite to replace the demo's run and results.json")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cada-demo-") as scratch:
        data = generate_dataset(Path(scratch) / "synthetic", seed=args.seed)
        print(f"demo: synthetic data ({data}), preset cpu, RevDist + {preset('cpu').align}")
        settings = preset("cpu")
        settings.seed = args.seed
        if args.iters is not None:
            settings.base.iters, settings.base.epochs = args.iters, None
        detector = train_and_save(settings, data, out / "run", progress=not args.quiet, overwrite=args.overwrite)
        results = evaluate_and_report(detector, data, out / "results.json", progress=not args.quiet)
    rows = {(r["align"], r["protocol"]): r for r in results["rows"]}
    base, aligned = rows[("none", "absolute-unified")], rows[(settings.align, "absolute-unified")]
    print(f"absolute-unified I-AUROC: base {100 * base['i_auroc']:.1f} -> +{settings.align} {100 * aligned['i_auroc']:.1f}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_ablate(args) -> int:
    from cada.ablation import Ablation, format_rows, noisy_split, table_3, table_4, table_5
    from cada.api import Detector
    out = Path(args.out)
    check_output(out / "ablation.json", "--out", "file", inputs=[args.data], overwrite=args.overwrite)
    train_samples = _samples(args.data, "train", args.format)
    test_samples = _samples(args.data, "test", args.format, quiet=True)
    settings = _settings_from_args(args)
    settings.align = "none"  # the base alone; every aligner is fitted afterwards on its cached outputs
    started = time.perf_counter()
    if args.run:
        detector = Detector.load(args.run)
        # The noisy base (--noise) must be trained exactly as the reused one was.
        settings = Settings.from_dict({**detector.settings.to_dict(), "align": "none"})
    else:
        detector = train_and_save(settings, Path(args.data), out / "base", args.weights, progress=not args.quiet,
                                  overwrite=args.overwrite)
    base_seconds = time.perf_counter() - started

    def run_tables(ablation: Ablation, tables) -> dict:
        report = {}
        base = ablation.base_rows()["absolute-unified"]
        for title, variants in tables:
            entries = [("base (no alignment)", base, None)]
            for variant in variants:
                rows, seconds = ablation.run(variant)
                entries.append((variant.label, rows["absolute-unified"], seconds))
                report.setdefault(title, []).append({"variant": variant.label, "seconds": round(seconds, 2), **rows})
            print(format_rows(title, entries) + "\n")
        return report

    ablation = Ablation(detector, train_samples, test_samples, progress=not args.quiet)
    print(f"base: trained or loaded in {base_seconds:.0f} s; cached training statistics and test outputs in "
          f"{ablation.cache_seconds:.0f} s. Each variant below only fits an aligner on those caches.\n")
    tables = [("Table 3: regressor structure, dropout, score reduction (absolute-unified)", table_3()),
              ("Table 4: class-aware or agnostic (absolute-unified)", table_4()),
              ("Table 5: (u, gamma) or (u, sigma) (absolute-unified)", table_5())]
    report = {"base_seconds": round(base_seconds, 1), "cache_seconds": round(ablation.cache_seconds, 1),
              "tables": run_tables(ablation, tables)}
    if args.noise:
        noisy_train, reduced_test = noisy_split(train_samples, test_samples, args.noise, args.seed)
        moved = len(noisy_train) - len(train_samples)
        print(f"noisy training set: {moved} anomalous test images ({args.noise:.0%} per class) moved into training; "
              f"both bases below are evaluated on the {len(reduced_test)} remaining test images.\n")
        clean = Ablation(detector, train_samples, reduced_test, progress=not args.quiet)
        noisy_detector = Detector(settings, weights_path=args.weights).fit(noisy_train, progress=not args.quiet)
        noisy = Ablation(noisy_detector, noisy_train, reduced_test, progress=not args.quiet)
        report["noise"] = {
            "fraction": args.noise, "moved": moved,
            "clean": run_tables(clean, [("Table 5, clean training set", table_5())]),
            "noisy": run_tables(noisy, [(f"Table 5, noisy training set ({args.noise:.0%})", table_5())]),
        }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", report)
    print(f"wrote {out / 'ablation.json'}")
    return 0


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from cada.data.layouts import FORMATS

    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="data layout (default: recognised from the folder, and said which)")
    parser.add_argument("--no-cache", action="store_true", help="decode every image again instead of using the "
                        "on-disk cache of decoded images ($CADA_CACHE_DIR, default ~/.cache/cada)")


def positive_int(text: str) -> int:
    """argparse type of iteration counts: 0 would mean "no training", which is never what a user wants."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type of pass counts: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--method", choices=METHODS, default="revdist")
    parser.add_argument("--backbone", help="encoder name (default: the preset's)")
    parser.add_argument("--weights", help="local encoder weights file (.pth or .safetensors)")
    parser.add_argument("--image-size", type=int)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--iters", type=positive_int, help="base training iterations (default: the preset's)")
    length.add_argument("--epochs", type=positive_float, help="base training passes over the training images, "
                        "resolved to ceil(epochs x images / batch) iterations (default: the preset's)")
    parser.add_argument("--align-iters", type=positive_int, help="aligner training iterations (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out, once the new one is complete")
    _add_data_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cada", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and evaluate RevDist + the default aligner on synthetic data")
    demo.add_argument("--out", default="cada-demo", help="folder for the run and results.json")
    demo.add_argument("--iters", type=positive_int, help="base training iterations (default: the cpu preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    demo.set_defaults(func=cmd_demo)

    synth = commands.add_parser("synth", help="write the synthetic data set in the MVTec AD layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n-train", type=int, default=40)
    synth.add_argument("--n-test-good", type=int, default=10)
    synth.add_argument("--n-test-defect", type=int, default=12)
    synth.add_argument("--image-size", type=int, default=256)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)

    train = commands.add_parser("train", help="train one model on the normal images of all classes mixed")
    train.add_argument("--data", required=True, help="data root in the MVTec AD layout")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--holdout", type=float, default=0.0,
                       help="hold out this fraction of each class's training images to calibrate the threshold")
    train.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate for --holdout calibration")
    train.add_argument("--align", choices=ALIGNERS, default=Settings.align,
                       help="cada: the paper's (u, gamma) regressor; cada-sigma: (u, sigma); cada-score: gamma = the "
                            "image score; knn: the k nearest "
                            "training images give the z-score (and flag unfamiliar products); class-aware: CaDA-A, "
                            "needs class names at test (a reference); classifier: CaDA-B; none: the base alone")
    train.add_argument("--checkpoint-every", type=int, default=200, metavar="K",
                       help="write a checkpoint to OUT/resume every K training steps (0: only when interrupted)")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from OUT/resume (same settings), skipping finished stages")
    train.add_argument("--devices", type=int, metavar="N",
                       help="train in N processes (DistributedDataParallel): launches torchrun --nproc_per_node N")
    train.add_argument("--scale-lr", action="store_true",
                       help="multi-process: multiply the learning rates by the process count (default: unscaled; "
                            "the effective batch is the batch x the process count either way)")
    _add_training_options(train)
    train.set_defaults(func=cmd_train)

    calibrate = commands.add_parser("calibrate", help="choose the one decision threshold of a run")
    calibrate.add_argument("run", help="run folder; the threshold is stored in it")
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--normal", nargs="+", help="folders of held-out normal images (not the test set)")
    source.add_argument("--val", help="labelled validation data (its test split): F1-optimal threshold")
    calibrate.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate with --normal")
    _add_data_options(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    predict = commands.add_parser("predict", help="score images of any product: no class names, no layout")
    predict.add_argument("model", help="run folder, or an exported .onnx file")
    predict.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    predict.add_argument("--out", required=True, help="folder for predictions.csv/.json (and overlays, masks)")
    predict.add_argument("--overlays", action="store_true", help="write a heatmap overlay PNG per image")
    predict.add_argument("--masks", action="store_true", help="write a binary mask PNG per image (map >= threshold)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--quiet", action="store_true")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace earlier predictions in --out (their overlays and masks are removed)")
    predict.set_defaults(func=cmd_predict)

    export = commands.add_parser("export", help="one ONNX graph: image -> aligned map and image score")
    export.add_argument("run", help="run folder")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--out", required=True, help="the .onnx file to write (threshold and preprocessing: .json beside it)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .json)")
    export.set_defaults(func=cmd_export)

    ablate = commands.add_parser("ablate", help="the paper's Tables 3-5: train the base once, then every aligner")
    ablate.add_argument("--data", required=True, help="data root in the MVTec AD layout")
    ablate.add_argument("--out", required=True, help="folder for the base run and ablation.json")
    ablate.add_argument("--run", help="reuse this trained run as the base instead of training one")
    ablate.add_argument("--noise", type=float, default=0.0,
                        help="also train a base on a noisy training set: this fraction of each class's anomalous "
                             "test images moved into training, and compare (u, gamma) with (u, sigma) on it")
    _add_training_options(ablate)
    ablate.set_defaults(func=cmd_ablate, align="none")

    evaluate = commands.add_parser("evaluate", help="absolute-unified and model-unified metrics of a run")
    evaluate.add_argument("run", help="run folder written by `cada train`")
    evaluate.add_argument("--data", help="data root (its test split is used)")
    _add_data_options(evaluate)
    evaluate.add_argument("--normal", nargs="+", help="with --format folder: folders of normal test images")
    evaluate.add_argument("--anomalous", nargs="+", help="with --format folder: folders of anomalous test images")
    evaluate.add_argument("--masks", nargs="+", help="with --format folder: mask folders (matched by file stem)")
    evaluate.add_argument("--json", help="write the results here")
    evaluate.add_argument("--plots", help="folder for score_distributions.png (per class, before/after alignment)")
    evaluate.add_argument("--report", help="folder for report.html: tables, score distributions, image gallery")
    evaluate.add_argument("--pixel-resolution", choices=("model", "original"), default="model",
                          help="compare maps and masks at the model's input size (default) or at each mask's own "
                               "size, maps upsampled bilinearly (exact; 4 bytes per normal pixel of memory)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an existing --json file and non-empty --plots/--report folders")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (OSError, ValueError, SafetensorError) as error:
        # Bad input (and a file system that refuses) gets one clear line, not a traceback; real bugs still raise.
        if args.debug:
            raise
        message = _os_error(error) if isinstance(error, OSError) else str(error)
        print(f"cada {args.command}: error: {printable(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # TrainingInterrupted says where its checkpoint is and how to resume
        print(f"cada {args.command}: {error or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
