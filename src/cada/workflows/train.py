"""`cada train`: one model trained on the normal images of every product mixed, written as a run folder."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

from cada.config import Settings
from cada.files import check_output, folder_lock, os_error, printable
from cada.threshold import check_fpr
from cada.workflows.common import describe_calibration

log = logging.getLogger(__name__)
LOGGERS = ("csv", "tensorboard")  # the training log: the CSV always, TensorBoard scalars as well on request


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
