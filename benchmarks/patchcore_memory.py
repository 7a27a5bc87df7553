"""PatchCore memory and fit time against the size of the training set (wide_resnet50_2, 256x256).

    python benchmarks/patchcore_memory.py [--sizes 1000 4000 8700] [--threads 2] [--backbone wide_resnet50_2]
                                          [--encoder real|stub]

Each size runs in its own process, so the peak resident memory (ru_maxrss) is that fit's own. The training
images are random uint8 256x256 images (N x 3 x 256 x 256 in memory, as `Detector.fit` hands them over: 1.7 GB
at 8.7k); the encoder has random weights: neither memory nor time depends on them. Prints, per size: fit seconds,
resident memory before fit (interpreter + model + images) and its peak during fit, the coreset (memory bank)
size, and one PatchCore forward pass on two test images against that bank (the chunked nearest-neighbour search
is the inference cost, and it grows with the bank); then how the peak grows per 1,000 training images.
The paper could not run PatchCore on VisA (8,659 training images) for lack of CPU memory.

`--encoder stub` replaces the encoder by random features of its exact shapes (wide_resnet50_2: 256, 512 and 1024
channels at strides 4, 8, 16): memory and the coreset selection are measured as with the real encoder, without
the encoder's time (on 2 cores wide_resnet50_2 encodes ~7.5 images/s: 19 minutes for 8.7k images), so the
whole growth curve fits in a few minutes. Then fit time = this + N / (encoder images per second).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def resident_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def stub_encoder(real):
    """A module with the real encoder's channels and strides that returns random features of those shapes."""
    import torch

    class StubEncoder(torch.nn.Module):
        """Features of a pool of 8 random images, rolled by a random shift per batch: drawing fresh normal
        numbers for every image would cost as much time as the coreset itself."""

        channels, strides = real.channels, real.strides
        pools: dict = {}

        def forward(self, x):
            size, outputs = x.shape[-1], []
            for c, s in zip(self.channels, self.strides):
                pool = self.pools.setdefault((c, s), torch.randn(8, c, size // s, size // s))
                shift = int(torch.randint(0, pool[0].numel(), (1,)))
                picks = torch.arange(len(x)) % len(pool)
                outputs.append(pool[picks].flatten(1).roll(shift, dims=1).view(len(x), c, size // s, size // s))
            return outputs

    return StubEncoder()


def measure(n_images: int, backbone: str, threads: int, image_size: int, encoder: str) -> dict:
    import torch

    from cada.config import preset
    from cada.data.dataset import normalize
    from cada.methods.patchcore import PatchCore

    torch.set_num_threads(threads)
    settings = preset("paper", "patchcore")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PatchCore(backbone, image_size, pretrained=False, **settings.method_options())
    if encoder == "stub":
        model.encoder = stub_encoder(model.encoder)
    images = torch.empty(n_images, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n_images, 256):  # filled in pieces: no int64 temporary of the whole set
        piece = images[start : start + 256]
        piece.copy_(torch.randint(0, 256, piece.shape, generator=generator, dtype=torch.uint8))
    before = resident_gib()
    started = time.perf_counter()
    model.fit(images, settings.base, generator, progress=False)
    fit_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    test = torch.randint(0, 256, (2, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
    started = time.perf_counter()
    with torch.inference_mode():
        model(normalize(test))
    infer_seconds = (time.perf_counter() - started) / len(test)
    bank = model.memory_bank
    return {
        "n_images": n_images,
        "fit_seconds": round(fit_seconds, 1),
        "rss_before_fit_gib": round(before, 2),
        "peak_rss_gib": round(peak, 2),
        "bank_rows": len(bank),
        "bank_channels": bank.shape[1],
        "bank_gib": round(bank.numel() * bank.element_size() / 2**30, 2),
        "infer_seconds_per_image": round(infer_seconds, 2),
        "peak_rss_after_infer_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 8700])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--encoder",
        choices=("real", "stub"),
        default="real",
        help="stub: random features of the encoder's shapes (memory and coreset without its time)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in its own process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.backbone, args.threads, args.image_size, args.encoder)), flush=True)
        return
    encoder = "random weights" if args.encoder == "real" else "STUB: random features of its shapes, no encoding time"
    print(
        f"PatchCore fit, {args.backbone} ({encoder}), {args.image_size}x{args.image_size}, "
        f"{args.threads} threads, preset paper (coreset 10%, projection 128, blocks of 16384 patches)"
    )
    print(
        f"{'images':>7} {'fit s':>8} {'s/img':>6} {'RSS before':>10} {'peak RSS':>9} {'bank rows':>10} "
        f"{'bank GiB':>8} {'search s/img':>12}"
    )
    rows = []
    for n_images in args.sizes:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n_images),
                "--threads",
                str(args.threads),
                "--backbone",
                args.backbone,
                "--image-size",
                str(args.image_size),
                "--encoder",
                args.encoder,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{n_images:>7} {row['fit_seconds']:>8.1f} {row['fit_seconds'] / n_images:>6.3f} "
            f"{row['rss_before_fit_gib']:>9.2f}G {row['peak_rss_gib']:>8.2f}G {row['bank_rows']:>10} "
            f"{row['bank_gib']:>8.2f} {row['infer_seconds_per_image']:>12.2f}",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        per_k = 1000 * (last["peak_rss_gib"] - first["peak_rss_gib"]) / (last["n_images"] - first["n_images"])
        images_per_k = 1000 * 3 * args.image_size**2 / 2**30
        bank_per_k = 1000 * (last["bank_gib"] - first["bank_gib"]) / (last["n_images"] - first["n_images"])
        print(
            f"growth: peak RSS +{per_k:.2f} GiB per 1,000 training images (of which the uint8 images "
            f"{images_per_k:.2f} GiB and the memory bank {bank_per_k:.2f} GiB); linear in N, no N^2 term"
        )
    if rows and rows[-1]["n_images"] >= 8659:
        verdict = "under" if rows[-1]["peak_rss_gib"] < 16 else "OVER"
        print(
            f"VisA-sized fit ({rows[-1]['n_images']} images): peak {rows[-1]['peak_rss_gib']:.2f} GiB, {verdict} 16 GiB"
        )


if __name__ == "__main__":
    main()
