"""`cada synth`: the synthetic data set in the MVTec AD layout."""

from __future__ import annotations

import argparse


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-test-defect", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from cada.data.synthetic import generate_dataset

    root = generate_dataset(
        args.out,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote synthetic data set to {root}")
    return 0
