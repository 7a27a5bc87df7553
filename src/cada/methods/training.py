"""The training machinery every method shares: features by index, the optimiser, the loop, and around the loop
multi-process training (DistributedDataParallel) and checkpoints to resume an interrupted run.

One loop (`train_loop`) serves every base method (through `run_training`) and the aligners' heads (through
`cada.align.base.train_head`), so distribution and resume live here once.

Multi-process (launched by ``torchrun``; see `init_distributed`): the trainable module is wrapped in PyTorch's
DistributedDataParallel, so its gradients are all-reduced (averaged) over the processes at every step. Every
process draws the same *global* batch from the one seeded generator (identical on every rank) and takes its
own slice of it: rank r gets items [r * b, (r + 1) * b) of the global batch of b * world items, the
equivalent of a DistributedSampler. The effective batch is therefore the per-process batch x the number of
processes, and the learning rate is *not* scaled with it unless the settings say so (`scale_lr`); rank 0
states both when training starts. BatchNorm normalises with each process's own slice, as under plain DDP.

Resume: with a `Checkpointing` active (``cada train --out RUN`` sets one up in RUN/resume), rank 0 writes every
`every` steps the model weights, the optimiser state, the scheduler step, the iteration, the random state
(the run's generator, torch's global generator and the rest of the current pass over the images) and the loss
history to RUN/resume/state.safetensors, plus a readable copy of the non-tensor part in state.json. Nothing is
pickled: the optimiser state is flattened to named tensors, its structure is JSON. The one file is written via a
temporary file and a rename, so a kill mid-write leaves the previous checkpoint intact. SIGINT/SIGTERM stop the
run after writing a checkpoint at the current step (`TrainingInterrupted`). The long passes outside the step
loop (encoding the training images, PatchCore's coreset, the training-set maps) call `stop_point` between
batches, so a signal stops them within a batch too, keeping the last checkpoint written.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from cada.data.dataset import normalize
from cada.files import atomic_write

# -- processes ----------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def backend_name() -> str:
    return str(dist.get_backend()) if is_distributed() else "none"


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    False (and nothing done) in a plain single process. Backend: gloo for CPU tensors, and NCCL for CUDA
    tensors when CUDA is available (``cpu:gloo,cuda:nccl``; each process then uses GPU LOCAL_RANK).
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: multi-process training is unavailable")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        if not dist.is_gloo_available():
            raise RuntimeError("multi-process training on CPUs needs the gloo backend, which this PyTorch lacks")
        backend = "gloo"
    dist.init_process_group(backend)
    return True


def shard_of(global_batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a global batch (all of it in a single process)."""
    per_rank = len(global_batch) // world_size()
    return global_batch[rank() * per_rank : (rank() + 1) * per_rank]


def batch_shard(n_items: int, batch_size: int) -> list[int]:
    """The items this process handles in sharded inference: whole batches of the single-process split, batch b
    on rank b % world, so every item is computed in exactly the batch it would be in one process."""
    world, me = world_size(), rank()
    return [i for b, start in enumerate(range(0, n_items, batch_size)) if b % world == me
            for i in range(start, min(start + batch_size, n_items))]


def lr_factor(settings) -> int:
    """The learning-rate multiplier under `settings`: the process count with `scale_lr`, else 1."""
    return world_size() if getattr(settings, "scale_lr", False) else 1


def describe_distribution(name: str, batch_size: int, optimizer: torch.optim.Optimizer, settings) -> str:
    lrs = ", ".join(f"{group['lr']:g}" for group in optimizer.param_groups)
    world = world_size()
    how = f"scaled x{world} (scale_lr)" if lr_factor(settings) > 1 else "not scaled with the process count"
    return (f"{name}: DistributedDataParallel over {world} processes ({backend_name()}); batch {batch_size} per "
            f"process, effective batch {batch_size * world}; lr {lrs} ({how})")


# -- features, optimiser ------------------------------------------------------------------------------------


class FeatureSource:
    """Frozen-encoder features of the training images by index, for the training loops of every method.

    A frozen encoder sees every image identically each time (no augmentation), so its features are computed
    once and kept when they fit in `cache_gib`; otherwise they are recomputed per batch.
    """

    def __init__(self, encode, images: torch.Tensor, batch_size: int, cache_gib: float):
        self.encode, self.images, self.cached = encode, images, None
        with torch.no_grad():
            probe = encode(normalize(images[:1]))
        if len(images) * sum(f.numel() * f.element_size() for f in probe) <= cache_gib * 2**30:
            chunks = []
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    stop_point("encoding the training images")
                    chunks.append(encode(normalize(images[start : start + batch_size])))
            self.cached = [torch.cat(scale) for scale in zip(*chunks)]

    def __getitem__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self.cached is not None:
            return [scale[batch] for scale in self.cached]
        with torch.no_grad():
            return self.encode(normalize(self.images[batch]))


def make_optimizer(groups: list[dict], settings) -> torch.optim.AdamW:
    """AdamW over parameter groups; a group without its own "lr" gets settings.lr.

    With `settings.scale_lr` under multi-process training, every lr is multiplied by the process count.
    """
    factor = lr_factor(settings)
    groups = [{**group, "lr": group["lr"] * factor} if "lr" in group else group for group in groups]
    return torch.optim.AdamW(groups, lr=settings.lr * factor, betas=tuple(settings.betas), eps=settings.eps,
                             weight_decay=settings.weight_decay, amsgrad=settings.amsgrad)


# -- samplers: the global batch of each step, from the shared generator ---------------------------------------


class PassSampler:
    """Batches that walk through the items in a fresh random order per pass (no repeats within a pass).

    The rest of the current pass (`order`) is part of the random state a checkpoint keeps.
    """

    def __init__(self, n_items: int, batch_size: int):
        self.n_items, self.global_batch = n_items, batch_size * world_size()
        self.order = torch.empty(0, dtype=torch.long)

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        while len(self.order) < self.global_batch:
            self.order = torch.cat([self.order, torch.randperm(self.n_items, generator=generator)])
        batch, self.order = self.order[: self.global_batch], self.order[self.global_batch :]
        return shard_of(batch)

    def state(self) -> dict[str, torch.Tensor]:
        return {"order": self.order}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.order = tensors["order"].clone()


class DrawSampler:
    """Batches drawn uniformly with replacement (the aligners' heads)."""

    def __init__(self, n_items: int, batch_size: int):
        self.n_items, self.global_batch = n_items, batch_size * world_size()

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        return shard_of(torch.randint(self.n_items, (self.global_batch,), generator=generator))

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


# -- the loop -----------------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """The loss of one batch as a module's forward, so DDP's reducer sees the step and all-reduces the gradients."""

    def __init__(self, module: nn.Module, loss_of: Callable[[int, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module = module
        self.loss_of = loss_of

    def forward(self, iteration: int, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_of(iteration, batch)


def _wrap(module: nn.Module | None, optimizer, loss_of, find_unused_parameters: bool) -> nn.Module:
    if module is None:  # no module given: the optimiser's parameters (their buffers, if any, are not synchronised)
        module = nn.ParameterList([p for group in optimizer.param_groups for p in group["params"]])
    objective = _Objective(module, loss_of)
    if not is_distributed():
        return objective
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: inputs (batch indices) stay where they are; the module's parameters decide the device.
    return DistributedDataParallel(objective, device_ids=None, find_unused_parameters=find_unused_parameters)


def _sync_buffers(module: nn.Module) -> None:
    """DDP broadcasts rank 0's buffers (e.g. BatchNorm statistics) before each forward; after the last step
    each process holds its own update, so rank 0's are broadcast once more to leave every copy identical."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def train_loop(name: str, iters: int, optimizer: torch.optim.Optimizer, generator: torch.Generator, progress: bool,
               loss_of: Callable[[int, torch.Tensor], torch.Tensor], sampler, settings,
               scheduler=None, module: nn.Module | None = None, find_unused_parameters: bool = False) -> list[float]:
    """`iters` optimiser steps of `loss_of(iteration, batch_indices)` on batches from `sampler`; the losses.

    Under torch.distributed: DDP over `module` (default: the optimiser's parameters), each process its slice
    of every global batch, the loss history the mean over processes. With a `Checkpointing` active: resumes
    from its checkpoint if it holds this stage, writes one every `every` steps, and stops cleanly on a signal.
    """
    objective = _wrap(module, optimizer, loss_of, find_unused_parameters)
    session = current_checkpointing()
    losses: list[float] = []
    start = 0
    if session is not None:
        start, losses = session.begin_loop(name, iters, optimizer, scheduler, generator, sampler)
    if is_distributed() and is_main():
        print(describe_distribution(name, sampler.global_batch // world_size(), optimizer, settings), flush=True)
    bar = tqdm(range(start, iters), desc=f"{name} training", disable=not (progress and is_main()), leave=False,
               initial=start, total=iters)
    for iteration in bar:
        batch = sampler(generator)
        loss = objective(iteration, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        stop = session is not None and session.stop_wanted()
        if is_distributed():  # one small all-reduce: the mean loss, and whether any process was told to stop
            shared = torch.tensor([loss.item(), float(stop)], dtype=torch.float64)
            dist.all_reduce(shared)
            loss_value, stop = shared[0].item() / world_size(), shared[1].item() > 0
        else:
            loss_value = loss.item()
        losses.append(loss_value)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if session is not None:
            session.after_step(iteration + 1, iters, optimizer, scheduler, generator, sampler, losses, stop)
    bar.close()
    _sync_buffers(objective)
    return losses


def run_training(name: str, n_images: int, settings, optimizer, generator: torch.Generator, progress: bool,
                 loss_of, module: nn.Module | None = None, find_unused_parameters: bool = False) -> list[float]:
    """`settings.iters` optimiser steps of `loss_of(iteration, batch_indices)` on random batches; the losses.

    Batches walk through the images in a fresh random order per pass, drawn from `generator`. With
    `settings.lr_drop_at`, every learning rate is multiplied by `settings.lr_drop` once that fraction (or each of
    those fractions) is done.
    `module` is what is trained (for DDP: its buffers are kept in step too); see `train_loop`.
    """
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.lr_milestones(), gamma=settings.lr_drop)
    return train_loop(name, settings.iters, optimizer, generator, progress, loss_of,
                      PassSampler(n_images, settings.batch_size), settings, scheduler, module, find_unused_parameters)


# -- checkpoints and resume ---------------------------------------------------------------------------------

RESUME_FORMAT = "cada-resume"
RESUME_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STOP_AFTER_ENV = "CADA_STOP_AFTER_STEPS"  # a test hook: act as if interrupted after this many steps


START_AGAIN = "start again with --overwrite instead of --resume"  # a checkpoint that cannot be resumed


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request (signal) after writing a checkpoint; the message says how to resume."""


class ResumeError(ValueError):
    """No checkpoint to resume from, or one written for other settings."""


def _json_safe(value):
    return json.loads(json.dumps(value))


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state_dict -> (named tensors, JSON structure that names them)."""
    tensors, state = {}, {}
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
    state = {int(parameter): {key: tensors[entry["tensor"]] if "tensor" in entry else entry["value"]
                              for key, entry in entries.items()}
             for parameter, entries in structure["state"].items()}
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
    checkpoint records the stage, the step within it and what finished stages left (their losses).
    """

    def __init__(self, folder: str | Path, modules: nn.Module, settings: dict, every: int = 200,
                 resume: bool = False, identity: dict | None = None, resume_hint: str = ""):
        if every < 0:
            raise ValueError(f"the checkpoint interval must be >= 0 (0: only on interrupt), got {every}")
        self.folder, self.modules, self.every = Path(folder), modules, every
        self.settings = _json_safe(settings)
        self.identity = _json_safe({**(identity or {}), "world_size": world_size()})
        self.resume_hint = resume_hint
        self.stage: str | None = None
        self.finished: dict[str, dict] = {}
        self.saved: dict | None = None  # the checkpoint resumed from
        self.saved_tensors: dict[str, torch.Tensor] = {}
        self._stop = threading.Event()
        self._steps = 0
        stop_after = os.environ.get(STOP_AFTER_ENV)
        self._stop_after = int(stop_after) if stop_after else None
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
            raise ResumeError(f"{path} is not a readable checkpoint (truncated or damaged? {error}): "
                              f"{START_AGAIN}") from None
        if metadata.get("format") != RESUME_FORMAT or "state" not in metadata:
            raise ResumeError(f"{path} is not a cada resume checkpoint")
        saved = json.loads(metadata["state"])
        if saved.get("format_version") != RESUME_VERSION:
            raise ResumeError(f"{path} is in checkpoint format {saved.get('format_version')}; this cada reads "
                              f"{RESUME_VERSION}: {START_AGAIN}")
        saved_data, data = saved["identity"].get("data_fingerprint"), self.identity.get("data_fingerprint")
        if saved_data != data:
            raise ResumeError(f"the training data differ from those the checkpoint in {self.folder} was trained on "
                              f"(file paths or image contents changed): resume with the same data, or {START_AGAIN}")
        differences = _settings_differences(saved["settings"], self.settings)
        differences += _settings_differences(saved["identity"], self.identity)
        if differences:
            raise ResumeError(f"the checkpoint in {self.folder} was written with other settings; resume with the "
                              f"same ones (or {START_AGAIN}): " + "; ".join(differences))
        self.saved, self.saved_tensors, self.finished = saved, tensors, dict(saved["finished"])

    def resumed_stage(self) -> str | None:
        return None if self.saved is None else self.saved["stage"]

    def describe(self) -> str:
        saved = self.saved
        return f"resuming from {self.folder}: {saved['stage']} training at step {saved['iteration']} of {saved['total']}"

    def restore_model(self) -> None:
        state = {key.removeprefix("model/"): value for key, value in self.saved_tensors.items()
                 if key.startswith("model/")}
        result = self.modules.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ResumeError(f"the checkpoint in {self.folder} holds weights this model lacks: "
                              f"{result.unexpected_keys[:5]}")

    def _restore_random_state(self, generator: torch.Generator) -> None:
        generator.set_state(self.saved_tensors["rng/generator"])
        torch.set_rng_state(self.saved_tensors["rng/torch"])
        if torch.cuda.is_available():
            states = [self.saved_tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count())
                      if f"rng/cuda/{i}" in self.saved_tensors]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)

    # -- stages --
    def enter(self, stage: str) -> None:
        self.stage = stage

    def begin_loop(self, name: str, iters: int, optimizer, scheduler, generator, sampler) -> tuple[int, list[float]]:
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
        sampler.load_state({key.removeprefix("sampler/"): value for key, value in self.saved_tensors.items()
                            if key.startswith("sampler/")})
        if is_main():
            print(self.describe(), flush=True)
        self.saved = None  # restored once; later stages start fresh
        return saved["iteration"], list(saved["losses"])

    def stop_wanted(self) -> bool:
        self._steps += 1
        if self._stop_after is not None and self._steps >= self._stop_after:
            self._stop.set()
        return self._stop.is_set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def interrupted(self, where: str) -> TrainingInterrupted:
        """The error for a stop outside the step loop: it names the checkpoint kept, if any."""
        if (self.folder / STATE_TENSORS).is_file():
            return TrainingInterrupted(
                f"training stopped while {where}; the last checkpoint is kept in {self.folder}. "
                f"Resume with: {self.resume_hint or 'the same command'} --resume")
        return TrainingInterrupted(f"training stopped while {where}, before its first checkpoint: nothing to "
                                   "resume, train again")

    def after_step(self, done: int, iters: int, optimizer, scheduler, generator, sampler, losses: list[float],
                   stop: bool) -> None:
        due = self.every > 0 and done % self.every == 0 and done < iters
        if stop or due:
            self.write(done, iters, optimizer, scheduler, generator, sampler, losses)
        if stop:
            raise TrainingInterrupted(
                f"training stopped at {self.stage} step {done} of {iters}; checkpoint in {self.folder}. "
                f"Resume with: {self.resume_hint or 'the same command'} --resume")

    def finish_stage(self, stage: str, losses: list[float], generator: torch.Generator, next_stage: str,
                     **info) -> None:
        """Record a finished stage and checkpoint the start of the next one."""
        self.finished[stage] = {"losses": losses, **info}
        self.stage = next_stage
        self.write(0, 0, None, None, generator, None, [])

    def write(self, done: int, iters: int, optimizer, scheduler, generator, sampler, losses: list[float]) -> None:
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
                "format": RESUME_FORMAT, "format_version": RESUME_VERSION, "settings": self.settings,
                "identity": self.identity, "stage": self.stage, "iteration": done, "total": iters,
                "losses": losses, "finished": self.finished, "optimizer": structure,
                "scheduler": None if scheduler is None else {"last_epoch": scheduler.last_epoch},
            }
            text = json.dumps(state)
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}
            atomic_write(self.folder / STATE_TENSORS,  # the commit point
                         lambda path: save_file(tensors, str(path), metadata={"format": RESUME_FORMAT, "state": text}))
            readable = {key: value for key, value in state.items() if key not in ("losses", "finished")}
            readable["n_losses"] = len(losses)
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
            self._stop.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


_ACTIVE: list[Checkpointing] = []


def current_checkpointing() -> Checkpointing | None:
    return _ACTIVE[-1] if _ACTIVE else None


def stop_point(where: str) -> None:
    """Between batches of a long pass outside the step loop: stop here if SIGINT/SIGTERM asked for it."""
    session = current_checkpointing()
    if session is not None and session.stop_requested():
        raise session.interrupted(where)


@contextmanager
def checkpointing(session: Checkpointing | None) -> Iterator[Checkpointing | None]:
    """Make `session` the one the training loops checkpoint to (None: no checkpoints) while the block runs."""
    if session is None:
        yield None
        return
    _ACTIVE.append(session)
    try:
        with session.signals():
            yield session
    finally:
        _ACTIVE.remove(session)


__all__ = ["Checkpointing", "DrawSampler", "FeatureSource", "PassSampler", "ResumeError", "TrainingInterrupted",
           "checkpointing", "current_checkpointing", "init_distributed", "is_distributed", "is_main",
           "make_optimizer", "rank", "run_training", "shard_of", "stop_point", "train_loop", "world_size"]
