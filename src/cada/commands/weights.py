"""`cada weights`: its arguments; cada.weights lists and downloads."""

from __future__ import annotations

import argparse

from cada.files import printable


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "download"), nargs="?", default="list")
    parser.add_argument("names", nargs="*", metavar="NAME", help="encoders to download (see `cada weights list`)")


def run(args) -> int:
    from cada.weights import download, status

    if args.action == "download":
        for name in args.names:
            print(f"{name}: {download(name)}")
        return 0
    for name, path, origin in status():
        print(f"{name:26s} {printable(path) if path else 'missing'}  ({origin})")
    return 0
