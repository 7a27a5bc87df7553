"""The one training loop: every base method (`Trainer.run`) and the aligners' heads (`Trainer.loop`) train here,
so multi-process training and resume live in one place.

Multi-process (launched by ``torchrun``; see `cada.engine.distributed`): the trainable module is wrapped in
PyTorch's DistributedDataParallel, so its gradients are all-reduced (averaged) over the processes at every step;
each process trains on its slice of the global batch. Rank 0 states the effective batch and the learning rates
when training starts. BatchNorm normalises with each process's own slice, as under plain DDP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from cada.engine.device import autocast
from cada.engine.distributed import describe_distribution, is_distributed, is_main, lr_factor, world_size
from cada.engine.log import log_row
from cada.engine.resume import Checkpointing
from cada.engine.samplers import PassSampler

log = logging.getLogger(__name__)

LossOf = Callable[[int, torch.Tensor], torch.Tensor]  # (iteration, batch indices) -> loss of that batch


def make_optimizer(groups: list[dict], settings) -> torch.optim.AdamW:
    """AdamW over parameter groups; a group without its own "lr" gets settings.lr.

    With `settings.scale_lr` under multi-process training, every lr is multiplied by the process count.
    """
    factor = lr_factor(settings)
    groups = [{**group, "lr": group["lr"] * factor} if "lr" in group else group for group in groups]
    return torch.optim.AdamW(
        groups,
        lr=settings.lr * factor,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        amsgrad=settings.amsgrad,
    )


class _Objective(nn.Module):
    """The loss of one batch as a module's forward, so DDP's reducer sees the step and all-reduces the gradients."""

    def __init__(self, module: nn.Module, loss_of: LossOf):
        super().__init__()
        self.module = module
        self.loss_of = loss_of

    def forward(self, iteration: int, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_of(iteration, batch)


def _wrap(module: nn.Module | None, optimizer, loss_of: LossOf, find_unused_parameters: bool) -> nn.Module:
    if module is None:  # no module given: the optimiser's parameters (their buffers, if any, are not synchronised)
        module = nn.ParameterList([p for group in optimizer.param_groups for p in group["params"]])
    objective = _Objective(module, loss_of)
    if not is_distributed():
        return objective
    from torch.nn.parallel import DistributedDataParallel

    # One GPU per process (device_ids); on the CPU device_ids=None. Inputs are batch indices: each loss moves
    # its own data to the device.
    device = next((p.device for p in objective.parameters()), torch.device("cpu"))
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _sync_buffers(module: nn.Module) -> None:
    """DDP broadcasts rank 0's buffers (e.g. BatchNorm statistics) before each forward; after the last step
    each process holds its own update, so rank 0's are broadcast once more to leave every copy identical."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


class Trainer:
    """Runs the training of one run: its loops, with the run's checkpoint `session` (None: no checkpoints),
    progress bars (`progress`), the `device` data is moved to and the autocast dtype of the base method's forward
    passes (`precision`, None: float32; see `cada.engine.device`). Handed explicitly to `BaseMethod.fit` and
    `Aligner.fit`."""

    def __init__(
        self,
        session: Checkpointing | None = None,
        progress: bool = True,
        device: torch.device | str = "cpu",
        precision: torch.dtype | None = None,
    ):
        self.session, self.progress = session, progress
        self.device, self.precision = torch.device(device), precision
        # One row per optimiser step of every loop (cada.engine.log); a resumed session brings its rows so far.
        self.log: list[dict] = session.log if session is not None else []

    def autocast(self):
        """The base method's forward passes in the run's precision (the aligners train in float32)."""
        return autocast(self.device, self.precision)

    def signals(self):
        """While the block runs, SIGINT/SIGTERM stop training after a checkpoint (nothing to do without a session)."""
        return nullcontext() if self.session is None else self.session.signals()

    def stop_point(self, where: str) -> None:
        """Between batches of a long pass outside the step loop: stop here if SIGINT/SIGTERM asked for it."""
        if self.session is not None and self.session.stop_requested():
            raise self.session.interrupted(where)

    def loop(
        self,
        name: str,
        iters: int,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        loss_of: LossOf,
        sampler,
        settings,
        scheduler=None,
        module: nn.Module | None = None,
        find_unused_parameters: bool = False,
        precision: torch.dtype | None = None,
    ) -> list[float]:
        """`iters` optimiser steps of `loss_of(iteration, batch_indices)` on batches from `sampler`; the losses.

        The loss is computed under autocast to `precision` (None: float32); fp16 scales the loss against
        underflow (GradScaler).
        Under torch.distributed: DDP over `module` (default: the optimiser's parameters), each process its slice
        of every global batch, the loss history the mean over processes. With a session: resumes from its
        checkpoint if it holds this stage, writes one every `every` steps, and stops cleanly on a signal.
        """
        objective = _wrap(module, optimizer, loss_of, find_unused_parameters)
        session = self.session
        scaler = torch.amp.GradScaler(self.device.type) if precision == torch.float16 else None
        losses: list[float] = []
        start = 0
        if session is not None:
            start, losses = session.begin_loop(name, iters, optimizer, scheduler, generator, sampler, scaler)
        if is_distributed() and is_main():
            log.info(describe_distribution(name, sampler.global_batch // world_size(), optimizer, settings))
        bar = tqdm(
            range(start, iters),
            desc=f"{name} training",
            disable=not (self.progress and is_main()),
            leave=False,
            initial=start,
            total=iters,
        )
        for iteration in bar:
            step_started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            batch = sampler(generator)
            with autocast(self.device, precision):
                loss = objective(iteration, batch).float()
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
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
            seconds = time.perf_counter() - step_started
            self.log.append(log_row(name, iteration + 1, loss_value, lr, sampler.global_batch / seconds))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if session is not None:
                session.after_step(iteration + 1, iters, optimizer, scheduler, generator, sampler, stop, scaler)
        bar.close()
        _sync_buffers(objective)
        return losses

    def run(
        self,
        name: str,
        n_images: int,
        settings,
        optimizer,
        generator: torch.Generator,
        loss_of: LossOf,
        module: nn.Module | None = None,
        find_unused_parameters: bool = False,
    ) -> list[float]:
        """`settings.iters` optimiser steps of `loss_of(iteration, batch_indices)` on random batches; the losses.

        Batches walk through the images in a fresh random order per pass, drawn from `generator`. With
        `settings.lr_drop_at`, every learning rate is multiplied by `settings.lr_drop` once that fraction (or each
        of those fractions) is done. `module` is what is trained (for DDP: its buffers are kept in step too).
        """
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.lr_milestones(), gamma=settings.lr_drop)
        return self.loop(
            name,
            settings.iters,
            optimizer,
            generator,
            loss_of,
            PassSampler(n_images, settings.batch_size),
            settings,
            scheduler,
            module,
            find_unused_parameters,
            self.precision,
        )
