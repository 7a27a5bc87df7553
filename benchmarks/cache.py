"""Speed-up of the on-disk image cache: loading every realmix image (train + test, with masks) cold vs warm.

    python benchmarks/cache.py [--data ../shared/data/realmix] [--size 256] [--workers 1] [--repeats 2]

Cold: an empty cache folder (decode, resize, write the entry). Warm: the same call again (hash the file
bytes, read the entry). No-cache: decode only, for reference. Each measurement is the best of --repeats
(cold in a fresh folder each time), so file-system read-ahead of the source files counts for every run alike.
The cache lives in a temporary folder that is deleted at the end; the data are only read.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from cada.data import find_samples, iterate_batches


def load_everything(samples, size: int, workers: int, cache_dir) -> tuple[float, int]:
    started = time.perf_counter()
    count = sum(len(batch["index"]) for batch in iterate_batches(samples, size, 32, workers, cache_dir=cache_dir))
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "realmix"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="loader processes (0: in this process)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    samples = []
    for split in ("train", "test"):
        found, layout = find_samples(args.data, split)
        samples += found
    n_masks = sum(s.mask_path is not None for s in samples)
    print(
        f"{args.data} ({layout}): {len(samples)} images, {n_masks} masks, {args.size}x{args.size}, "
        f"{args.workers} loader worker(s)"
    )

    plain = min(load_everything(samples, args.size, args.workers, None)[0] for _ in range(args.repeats))
    cold, warm, entry_bytes = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad file or unwritable cache would make the figures meaningless
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="cada-cache-bench-") as folder:
                cold.append(load_everything(samples, args.size, args.workers, folder)[0])
                warm.append(load_everything(samples, args.size, args.workers, folder)[0])
                entry_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*.npy"))
    cold_s, warm_s = min(cold), min(warm)
    rate = lambda seconds: len(samples) / seconds  # noqa: E731
    print(f"no cache : {plain:7.2f} s  ({rate(plain):7.0f} images/s)")
    print(f"cold     : {cold_s:7.2f} s  ({rate(cold_s):7.0f} images/s)  decode + write")
    print(f"warm     : {warm_s:7.2f} s  ({rate(warm_s):7.0f} images/s)  hash + read")
    print(
        f"speed-up warm vs cold: {cold_s / warm_s:.1f}x, warm vs no cache: {plain / warm_s:.1f}x; "
        f"cache size {entry_bytes / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
