"""Checkpoints to resume an interrupted training run, and stopping cleanly on SIGINT/SIGTERM.

With a `Checkpointing` session (``cada train --out RUN`` sets one up in RUN/resume, handed to the `Trainer`), rank 0
writes every `every` steps the model weights, the optimiser state, the scheduler step, the iteration, the random
state (the run's generator, torch's global generator and the rest of the current pass over the images), fp16's
loss scale, the loss history and the training log (cada.engine.log) to RUN/resume/state.safetensors, plus a
readable copy of the non-tensor part in state.json. Nothing is pickled: the optimiser state is flattened to named
tensors, its structure is JSON. The one file is written via a temporary file and a rename, so a kill mid-write
leaves the previous checkpoint intact. SIGINT/SIGTERM stop the run after writing a checkpoint at the current step
(`TrainingInterrupted`). The long passes outside the step loop (encoding the training images, PatchCore's coreset,
the training-set maps) call `Trainer.stop_point` between batches, so a signal stops them within a batch too,
keeping the last checkpoint written.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn

from cada.checkpoint import save_tensors
from cada.engine.distributed import is_distributed, is_main, world_size
from cada.files import atomic_write

log = logging.getLogger(__name__)

# -- checkpoints and resume ---------------------------------------------------------------------------------

RESUME_FORMAT = "cada-resume"
RESUME_VERSION = 2  # 2: the training log and the fp16 loss scale
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


START_AGAIN = "start again with --overwrite instead of --resume"  # a checkpoint that cannot be resumed


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request (signal) after writing a checkpoint; the message says how to resume."""


class ResumeError(ValueError):
    """No checkpoint to resume from, or one written for other settings."""


def _json_safe(value):
    return json.loads(json.dumps(value))


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state_dict -> (named tensors, JSON structure that names them)."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for parameter, entries in state_dict["state"].items():
        state[str(parameter)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                name = f"optimizer/{parameter}/{key}"
                tensors[name] = value
                state[str(parameter)][key] = {"tensor": name}
            else:
                state[str(parameter)][key] = {"value": value}
    return tensors, {"state": state, "param_groups": _json_safe(state_dict["param_groups"])}


def _unflatten_optimizer(structure: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {
        int(parameter): {
            key: tensors[entry["tensor"]] if "tensor" in entry else entry["value"] for key, entry in entries.items()
        }
        for parameter, entries in structure["state"].items()
    }
    return {"state": state, "param_groups": structure["param_groups"]}


def _settings_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _settings_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return differences


def require_checkpoint(folder: str | Path) -> Path:
    """The checkpoint file in `folder`; ResumeError saying why when there is none."""
    folder = Path(folder)
    path = folder / STATE_TENSORS
    if not path.is_file():
        if (folder.parent / "config.json").is_file() and not folder.exists():
            raise ResumeError(f"{folder.parent} is a finished run: there is nothing to resume")
        raise ResumeError(f"no checkpoint to resume from: {path} does not exist (train without --resume)")
    return path


class Checkpointing:
    """Checkpoints of one training run in `folder` (RUN/resume), and resuming from them.

    `modules` holds everything trained (the detector's method and aligner); `settings` (a dict) and `identity`
    (e.g. the number of training images) must match on resume. Stages ("base", "aligner") run in order; a
    checkpoint records the stage, the step within it and what finished stages left; the losses so far are those of
    the training log it carries (`log`, shared with the Trainer).
    """

    def __init__(
        self,
        folder: str | Path,
        modules: nn.Module,
        settings: dict,
        every: int = 200,
        resume: bool = False,
        identity: dict | None = None,
        resume_hint: str = "",
    ):
        if every < 0:
            raise ValueError(f"the checkpoint interval must be >= 0 (0: only on interrupt), got {every}")
        self.folder, self.modules, self.every = Path(folder), modules, every
        self.settings = _json_safe(settings)
        self.identity = _json_safe({**(identity or {}), "world_size": world_size()})
        self.resume_hint = resume_hint
        self.stage: str | None = None
        self.finished: dict[str, dict] = {}
        self.log: list[dict] = []  # the training log (cada.engine.log), shared with the Trainer
        self.saved: dict | None = None  # the checkpoint resumed from
        self.saved_tensors: dict[str, torch.Tensor] = {}
        self._stop = threading.Event()
        if resume:
            self._load()

    # -- reading --
    def _load(self) -> None:
        path = require_checkpoint(self.folder)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as error:
            raise ResumeError(
                f"{path} is not a readable checkpoint (truncated or damaged? {error}): {START_AGAIN}"
            ) from None
        if metadata.get("format") != RESUME_FORMAT or "state" not in metadata:
            raise ResumeError(f"{path} is not a cada resume checkpoint")
        saved = json.loads(metadata["state"])
        if saved.get("format_version") != RESUME_VERSION:
            raise ResumeError(
                f"{path} is in checkpoint format {saved.get('format_version')}; this cada reads "
                f"{RESUME_VERSION}: {START_AGAIN}"
            )
        saved_data, data = saved["identity"].get("data_fingerprint"), self.identity.get("data_fingerprint")
        if saved_data != data:
            raise ResumeError(
                f"the training data differ from those the checkpoint in {self.folder} was trained on "
                f"(file paths or image contents changed): resume with the same data, or {START_AGAIN}"
            )
        differences = _settings_differences(saved["settings"], self.settings)
        differences += _settings_differences(saved["identity"], self.identity)
        if differences:
            raise ResumeError(
                f"the checkpoint in {self.folder} was written with other settings; resume with the "
                f"same ones (or {START_AGAIN}): " + "; ".join(differences)
            )
        self.saved, self.saved_tensors, self.finished = saved, tensors, dict(saved["finished"])
        self.log[:] = saved["log"]

    def resumed_stage(self) -> str | None:
        return None if self.saved is None else self.saved["stage"]

    def describe(self) -> str:
        saved = self.saved or {}
        return (
            f"resuming from {self.folder}: {saved['stage']} training at step {saved['iteration']} of {saved['total']}"
        )

    def restore_model(self) -> None:
        state = {
            key.removeprefix("model/"): value for key, value in self.saved_tensors.items() if key.startswith("model/")
        }
        result = self.modules.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ResumeError(
                f"the checkpoint in {self.folder} holds weights this model lacks: {result.unexpected_keys[:5]}"
            )

    def _restore_random_state(self, generator: torch.Generator) -> None:
        generator.set_state(self.saved_tensors["rng/generator"])
        torch.set_rng_state(self.saved_tensors["rng/torch"])
        if torch.cuda.is_available():
            states = [
                self.saved_tensors[f"rng/cuda/{i}"]
                for i in range(torch.cuda.device_count())
                if f"rng/cuda/{i}" in self.saved_tensors
            ]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)

    # -- stages --
    def enter(self, stage: str) -> None:
        self.stage = stage

    def begin_loop(
        self, name: str, iters: int, optimizer, scheduler, generator, sampler, scaler=None
    ) -> tuple[int, list[float]]:
        """Restore this loop's state if the checkpoint is in the current stage: (first step, losses so far)."""
        saved = self.saved
        if saved is None or saved["stage"] != self.stage:
            return 0, []
        if saved["iteration"] and saved["total"] != iters:
            raise ResumeError(f"the checkpoint's {self.stage} training has {saved['total']} steps, this one {iters}")
        self.restore_model()
        self._restore_random_state(generator)
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(_unflatten_optimizer(saved["optimizer"], self.saved_tensors))
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.last_epoch = saved["scheduler"]["last_epoch"]
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        sampler.load_state(
            {
                key.removeprefix("sampler/"): value
                for key, value in self.saved_tensors.items()
                if key.startswith("sampler/")
            }
        )
        if is_main():
            log.info(self.describe())
        self.saved = None  # restored once; later stages start fresh
        return saved["iteration"], self.losses_of(name)

    def losses_of(self, name: str) -> list[float]:
        """The losses logged so far by the loop called `name` (a method's name, or an aligner's head)."""
        return [row["loss"] for row in self.log if row["stage"] == name]

    def request_stop(self) -> None:
        """Stop at the next step (after checkpointing it) or the next stop point: what SIGINT/SIGTERM do."""
        self._stop.set()

    def stop_wanted(self) -> bool:
        """Asked by the loop after every optimiser step."""
        return self._stop.is_set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def interrupted(self, where: str) -> TrainingInterrupted:
        """The error for a stop outside the step loop: it names the checkpoint kept, if any."""
        if (self.folder / STATE_TENSORS).is_file():
            return TrainingInterrupted(
                f"training stopped while {where}; the last checkpoint is kept in {self.folder}. "
                f"Resume with: {self.resume_hint or 'the same command'} --resume"
            )
        return TrainingInterrupted(
            f"training stopped while {where}, before its first checkpoint: nothing to resume, train again"
        )

    def after_step(
        self,
        done: int,
        iters: int,
        optimizer,
        scheduler,
        generator,
        sampler,
        stop: bool,
        scaler=None,
    ) -> None:
        due = self.every > 0 and done % self.every == 0 and done < iters
        if stop or due:
            self.write(done, iters, optimizer, scheduler, generator, sampler, scaler)
        if stop:
            raise TrainingInterrupted(
                f"training stopped at {self.stage} step {done} of {iters}; checkpoint in {self.folder}. "
                f"Resume with: {self.resume_hint or 'the same command'} --resume"
            )

    def finish_stage(self, stage: str, generator: torch.Generator, next_stage: str, **info) -> None:
        """Record a finished stage and checkpoint the start of the next one."""
        self.finished[stage] = info
        self.stage = next_stage
        self.write(0, 0, None, None, generator, None)

    def write(self, done: int, iters: int, optimizer, scheduler, generator, sampler, scaler=None) -> None:
        """Rank 0 writes the checkpoint (one atomic file, then a readable JSON copy); the others wait for it."""
        if is_main():
            tensors = {f"model/{key}": value for key, value in self.modules.state_dict().items()}
            structure = None
            if optimizer is not None:
                optimizer_tensors, structure = _flatten_optimizer(optimizer.state_dict())
                tensors.update(optimizer_tensors)
            if sampler is not None:
                tensors.update({f"sampler/{key}": value for key, value in sampler.state().items()})
            tensors["rng/generator"] = generator.get_state()
            tensors["rng/torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            state = {
                "format": RESUME_FORMAT,
                "format_version": RESUME_VERSION,
                "settings": self.settings,
                "identity": self.identity,
                "stage": self.stage,
                "iteration": done,
                "total": iters,
                "finished": self.finished,
                "optimizer": structure,
                "scheduler": None if scheduler is None else {"last_epoch": scheduler.last_epoch},
                "scaler": None if scaler is None else _json_safe(scaler.state_dict()),  # fp16: the loss scale
                "log": self.log,
            }
            text = json.dumps(state)
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}
            # The commit point:
            save_tensors(tensors, self.folder / STATE_TENSORS, {"format": RESUME_FORMAT, "state": text})
            readable = {key: value for key, value in state.items() if key not in ("finished", "log")}
            readable["logged_steps"] = len(self.log)
            readable["finished_stages"] = sorted(self.finished)
            atomic_write(self.folder / STATE_JSON, json.dumps(readable, indent=2) + "\n")
        if is_distributed():
            dist.barrier()

    def complete(self) -> None:
        """The run finished: its checkpoint is no longer needed."""
        if is_main():
            for name in (STATE_TENSORS, STATE_JSON):
                (self.folder / name).unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass

    # -- signals --
    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after checkpointing the current step; a second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.request_stop()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
