"""The training engine every method and aligner shares: process helpers (`distributed`), batch samplers
(`samplers`), the frozen-feature cache (`features`), the loop (`loop.Trainer`) and checkpoints to resume
(`resume.Checkpointing`). It knows nothing about methods or aligners; they import it, never each other."""

from cada.engine.distributed import (
    batch_shard,
    init_distributed,
    is_distributed,
    is_main,
    lr_factor,
    rank,
    shard_of,
    world_size,
)
from cada.engine.features import FeatureSource
from cada.engine.loop import Trainer, make_optimizer
from cada.engine.resume import Checkpointing, ResumeError, TrainingInterrupted
from cada.engine.samplers import DrawSampler, PassSampler

__all__ = [
    "Checkpointing",
    "DrawSampler",
    "FeatureSource",
    "PassSampler",
    "ResumeError",
    "Trainer",
    "TrainingInterrupted",
    "batch_shard",
    "init_distributed",
    "is_distributed",
    "is_main",
    "lr_factor",
    "make_optimizer",
    "rank",
    "shard_of",
    "world_size",
]
