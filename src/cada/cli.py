"""The command-line front: `cada demo | synth | train | evaluate`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cada.config import ALIGNERS, METHODS, preset


def _settings_from_args(args):
    settings = preset(args.preset)
    settings.align = args.align
    settings.method = args.method
    settings.seed = args.seed
    if args.backbone:
        settings.backbone = args.backbone
    if args.image_size:
        settings.image_size = args.image_size
    if args.iters:
        settings.base.iters = args.iters
    if args.align_iters is not None:
        settings.aligner.iters = args.align_iters
    return settings.validate()


def train_and_save(settings, data: Path, out: Path, weights: str | None = None, progress: bool = True):
    from cada.api import Detector

    detector = Detector(settings, weights_path=weights)
    print(f"training {settings.method} ({settings.backbone}, {settings.image_size}px, {settings.base.iters} iters) "
          f"+ aligner {settings.align} on all classes of {data} mixed")
    detector.fit(data, progress=progress)
    info = detector.training_info
    print(f"  {info['n_images']} training images of {len(info['classes'])} classes; base {info['base_seconds']} s, "
          f"aligner {info['aligner_seconds']} s")
    detector.save(out)
    print(f"saved run to {out}")
    return detector


def evaluate_and_report(detector, data: Path, json_path: Path | None, progress: bool = True) -> dict:
    from cada.data.mvtec import mvtec_samples
    from cada.evaluate import collect, format_per_class, format_table, results_table

    samples = mvtec_samples(data, "test")
    started = time.perf_counter()
    outputs = collect(detector, samples, progress=progress)
    aligners = ("none",) if detector.settings.align == "none" else ("none", detector.settings.align)
    results = results_table(outputs, detector.settings.method, aligners)
    results["meta"] = {
        "data": str(data),
        "n_test_images": len(outputs.samples),
        "backbone": detector.settings.backbone,
        "image_size": detector.settings.image_size,
        "evaluate_seconds": round(time.perf_counter() - started, 1),
    }
    print(format_table(results))
    print("per class:")
    print(format_per_class(results))
    if json_path:
        from cada.checkpoint import write_json

        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, results)
        print(f"wrote {json_path}")
    return results


def cmd_synth(args) -> int:
    from cada.data.synthetic import generate_dataset

    root = generate_dataset(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                            n_test_defect=args.n_test_defect, image_size=args.image_size, seed=args.seed)
    print(f"wrote synthetic data set to {root}")
    return 0


def cmd_train(args) -> int:
    train_and_save(_settings_from_args(args), Path(args.data), Path(args.out), args.weights, not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from cada.api import Detector

    detector = Detector.load(args.run)
    evaluate_and_report(detector, Path(args.data), Path(args.json) if args.json else None, not args.quiet)
    return 0


def cmd_demo(args) -> int:
    from cada.data.synthetic import generate_dataset

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cada-demo-") as scratch:
        data = generate_dataset(Path(scratch) / "synthetic", seed=args.seed)
        print(f"demo: synthetic data ({data}), preset cpu, RevDist + CADA")
        settings = preset("cpu")
        settings.seed = args.seed
        if args.iters:
            settings.base.iters = args.iters
        detector = train_and_save(settings, data, out / "run", progress=not args.quiet)
        results = evaluate_and_report(detector, data, out / "results.json", progress=not args.quiet)
    rows = {(r["align"], r["protocol"]): r for r in results["rows"]}
    base, aligned = rows[("none", "absolute-unified")], rows[("cada", "absolute-unified")]
    print(f"absolute-unified I-AUROC: base {100 * base['i_auroc']:.1f} -> +CADA {100 * aligned['i_auroc']:.1f}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cada", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and evaluate RevDist + CADA on generated synthetic data")
    demo.add_argument("--out", default="cada-demo", help="folder for the run and results.json")
    demo.add_argument("--iters", type=int, help="base training iterations (default: the cpu preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
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
    train.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    train.add_argument("--method", choices=METHODS, default="revdist")
    train.add_argument("--align", choices=ALIGNERS, default="cada")
    train.add_argument("--backbone", help="encoder name (default: the preset's)")
    train.add_argument("--weights", help="local encoder weights file (.pth or .safetensors)")
    train.add_argument("--image-size", type=int)
    train.add_argument("--iters", type=int, help="base training iterations (default: the preset's)")
    train.add_argument("--align-iters", type=int, help="aligner training iterations (default: the preset's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="absolute-unified and model-unified metrics of a run")
    evaluate.add_argument("run", help="run folder written by `cada train`")
    evaluate.add_argument("--data", required=True, help="data root in the MVTec AD layout (its test split is used)")
    evaluate.add_argument("--json", help="write the results here")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        # Bad input gets one clear line, not a traceback; real bugs still raise.
        print(f"cada {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cada {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
