"""The global batch of each training step, drawn from the run's shared generator; each process keeps its shard."""

from __future__ import annotations

import torch

from cada.engine.distributed import shard_of, world_size


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
