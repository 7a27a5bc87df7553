"""PatchCore's nearest-neighbour search against this machine's matrix-product speed.

    python benchmarks/patchcore_search.py [--threads 2] [--queries 16384] [--bank 30000] [--channels 152 1536]

The search is one matrix product (queries x bank x channels multiply-adds) plus a running minimum, so its
ceiling is `torch.mm` of the same shapes. For each channel count (152: EfficientNet-Lite0's patch features,
1536: wide_resnet50_2's) this prints GFLOP/s of `torch.mm` (the whole product at once), of the search
(`nearest_neighbours`), and of the plain chunked search it replaced (one full-formula distance matrix of 0.5 GiB
per chunk, clamped, then its minimum), and checks that the search returns the same neighbours. The default
sizes are one batch of 16 images at 256 px (16 x 32 x 32 patches) against a bank of 30,000 rows (mix6's 747
training images keep ~76,000).
Best of 3 repetitions; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cada.neighbours import chunk_rows, nearest_neighbours


def chunked_reference(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The search before tiling: per bank chunk, the whole query x chunk matrix |q|^2 - 2 q.k + |k|^2."""
    chunk = chunk_rows(len(queries), 0.5)
    best = queries.new_full((len(queries),), math.inf)
    best_index = torch.zeros(len(queries), dtype=torch.long)
    for start in range(0, len(bank), chunk):
        keys = bank[start : start + chunk]
        distances = torch.addmm(keys.pow(2).sum(dim=1).unsqueeze(0), queries, keys.T, alpha=-2.0)
        distances.add_(queries.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)
        values, index = distances.min(dim=1)
        better = values < best
        best, best_index = torch.where(better, values, best), torch.where(better, index + start, best_index)
    return best.sqrt(), best_index


def best_seconds(function, *inputs, repeats: int = 3) -> float:
    function(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*inputs)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=16384)
    parser.add_argument("--bank", type=int, default=30000)
    parser.add_argument("--channels", type=int, nargs="+", default=[152, 1536])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.queries} queries x {args.bank} bank rows, {args.threads} threads; GFLOP/s (2 x Q x N x C / s)")
    print(f"{'channels':>8} {'torch.mm':>9} {'search':>9} {'before':>9}  {'search s':>8}  same neighbours")
    for channels in args.channels:
        queries = torch.randn(args.queries, channels, generator=generator)
        bank = torch.randn(args.bank, channels, generator=generator)
        flop = 2 * args.queries * args.bank * channels
        product = best_seconds(torch.mm, queries, bank.T)
        search = best_seconds(nearest_neighbours, queries, bank)
        before = best_seconds(chunked_reference, queries, bank)
        distance, index = nearest_neighbours(queries, bank)
        old_distance, old_index = chunked_reference(queries, bank)
        same = torch.equal(index[:, 0], old_index) and torch.equal(distance[:, 0], old_distance)
        print(
            f"{channels:8d} {flop / product / 1e9:9.1f} {flop / search / 1e9:9.1f} {flop / before / 1e9:9.1f}  "
            f"{search:8.2f}  {same}"
        )


if __name__ == "__main__":
    main()
