"""The command line: `COMMANDS` is the table of `cada`'s commands, each with its help line and its module in
cada.commands (`arguments(parser)`, `run(args)`): a new command is one entry and one module. The commands parse
and print; the work is in cada.workflows (train, evaluate, calibrate, ablate, demo) and the modules they call
(predict, export, serve, weights). `main` shows the library's log and turns bad input into one line and exit
code 2."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from safetensors import SafetensorError

from cada.commands import ablate, calibrate, demo, evaluate, export, predict, serve, synth, train, weights
from cada.files import os_error, printable


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (as every other error) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One command of `cada`: its name, its one-line help, what adds its arguments and what runs it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("demo", "train and evaluate the default method on synthetic products", demo.arguments, demo.run),
    Command("synth", "write the synthetic data set in the MVTec AD layout", synth.arguments, synth.run),
    Command("train", "train one model on the normal images of all classes mixed", train.arguments, train.run),
    Command("calibrate", "choose the one decision threshold of a run", calibrate.arguments, calibrate.run),
    Command("predict", "score images of any product: no class names, no layout", predict.arguments, predict.run),
    Command("export", "one graph: image -> aligned map and image score (ONNX, OpenVINO)", export.arguments, export.run),
    Command(
        "ablate",
        "the paper's Tables 3-5: train the base (revdist unless told) once, then every aligner",
        ablate.arguments,
        ablate.run,
    ),
    Command("serve", "an HTTP API and a web page that score images (docs/serving.md)", serve.arguments, serve.run),
    Command(
        "weights",
        "which encoders' ImageNet weights are here; download the missing ones (needs internet)",
        weights.arguments,
        weights.run,
    ),
    Command("evaluate", "absolute-unified and model-unified metrics of a run", evaluate.arguments, evaluate.run),
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cada",
        description="One anomaly detector for every product on a line: one model, no class names, one threshold.",
        epilog="cada COMMAND --help for a command's options; the README and docs/ for more.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--verbose", action="store_true", help="also the details: resolved settings, threads")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        arguments = commands.add_parser(command.name, help=command.help)
        command.arguments(arguments)
        arguments.set_defaults(func=command.run)
    return parser


def warning_line(command: str):
    """A `warnings.formatwarning` that writes a warning as the errors are written: one line, no source path."""

    def formatted(message, category, filename, lineno, line=None) -> str:
        return f"cada {command}: warning: {printable(message)}\n"

    return formatted


class ConsoleHandler(logging.Handler):
    """The library's log on the console: progress lines and results as they are on stdout, warnings and errors as
    one line on stderr, written to the streams of the moment (so that a caller's redirection holds)."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        message = printable(record.getMessage())
        if record.levelno >= logging.WARNING:
            print(f"cada {self.command}: {record.levelname.lower()}: {' '.join(message.split())}", file=sys.stderr)
        else:
            print(message, flush=True)


def console_logging(command: str, verbose: bool) -> Callable[[], None]:
    """Show the "cada" logger on the console, on rank 0 only under torchrun (the other processes: warnings and
    errors): what the library says at INFO, with --verbose its details too. Returns what undoes it."""
    from cada.engine.distributed import is_main

    library = logging.getLogger("cada")
    before = (library.level, library.propagate)
    handler = ConsoleHandler(command)
    library.setLevel(logging.WARNING if not is_main() else logging.DEBUG if verbose else logging.INFO)
    library.addHandler(handler)
    library.propagate = False

    def undo() -> None:
        library.removeHandler(handler)
        library.level, library.propagate = before

    return undo


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage mistake, said in one line by Parser.error (2)
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = argv
    format_warning, warnings.formatwarning = warnings.formatwarning, warning_line(args.command)
    undo_logging = console_logging(args.command, args.verbose)
    try:
        return args.func(args)
    except (OSError, ValueError, SafetensorError) as error:
        # Bad input (and a file system that refuses) gets one clear line, not a traceback; real bugs still raise.
        if args.debug:
            raise
        message = os_error(error) if isinstance(error, OSError) else str(error)
        print(f"cada {args.command}: error: {printable(' '.join(message.split()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # TrainingInterrupted says where its checkpoint is and how to resume
        print(f"cada {args.command}: {error or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning
        undo_logging()


if __name__ == "__main__":
    raise SystemExit(main())
