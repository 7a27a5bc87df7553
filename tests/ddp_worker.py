"""One process of the 2-process test in test_distributed.py (run by torchrun; not a test module itself).

argv: DATA OUT. Trains RevDist + CADA, ReContrast + the classifier aligner and the default method (RevDist and a
PatchCore bank that each rank builds) with DDP, saves each rank's weights to OUT/<method>-rank<r>.safetensors,
then evaluates the RevDist run distributed (OUT/distributed.json) and predicts with it (OUT/predicted-distributed)."""

import logging
import sys
from pathlib import Path

from safetensors.torch import save_file

from cada.cli import main
from cada.config import preset
from cada.engine import init_distributed, rank, world_size
from cada.workflows import train

# the library logs its lines (the DDP description among them): show them as `cada` does
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
data, out = Path(sys.argv[1]), Path(sys.argv[2])
assert init_distributed() and world_size() == 2, "expected to run under torchrun with 2 processes"
for method, align in (("revdist", "cada"), ("recontrast", "classifier"), ("revdist-patchcore", "distance-only")):
    settings = preset("cpu", method)
    settings.image_size, settings.align = 64, align
    settings.base.iters, settings.base.epochs, settings.base.batch_size = 3, None, 2
    settings.aligner.iters, settings.aligner.batch_size = 4, 2
    detector = train(settings, data, out / method, progress=False, checkpoint_every=2)
    state = {key: value.contiguous() for key, value in detector._modules().state_dict().items()}
    save_file(state, str(out / f"{method}-rank{rank()}.safetensors"))
code = main(["evaluate", str(out / "revdist"), "--data", str(data), "--json", str(out / "distributed.json"), "--quiet"])
code = code or main(
    [
        "predict",
        str(out / "revdist"),
        str(data),
        "--out",
        str(out / "predicted-distributed"),
        "--batch-size",
        "8",
        "--overlays",
        "--quiet",
    ]
)
sys.exit(code)
