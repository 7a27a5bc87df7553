"""Where the work runs: the device (`--device`) and the precision of the networks (`--precision`).

Modules, cached features and every tensor the pipeline computes live on one device; images are decoded on the
CPU and moved there one batch at a time (`data.dataset.normalize(images, device)`: uint8 travels, a quarter of
float32). Random numbers are always drawn on the CPU from the run's generator, so a seed means the same batches
and the same noise on every device. Nothing device-specific is saved: a run trained on a GPU loads on a CPU
and the reverse.

Precision: with bf16 or fp16, the networks' forward passes run under `torch.autocast` (convolutions and matrix
products in half precision); their outputs (maps, features), the losses' reductions, the aligner and every
metric are float32. fp16 trains with a gradient scaler. `auto` is bf16 on a CUDA GPU that supports it and
float32 everywhere else.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for `spec`. auto: this process's GPU when CUDA is available (under torchrun the one of
    LOCAL_RANK), else Apple's MPS when available, else the CPU. ValueError naming what is missing otherwise."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use {DEVICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (no GPU, or a CPU-only PyTorch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:  # the process's current GPU (under torchrun: LOCAL_RANK's, set when joining)
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: Apple's MPS is not available here")
    elif device.type not in ("cpu", "meta"):  # meta: shapes only, for tests
        raise ValueError(f"unsupported device {spec!r}: use {DEVICES}")
    return device


def resolve_precision(spec: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `spec` on `device` (None: float32 throughout). auto: bf16 on CUDA GPUs that support
    it, else float32. Half precision on the CPU is allowed (bf16 autocast exists there; it is slower)."""
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise ValueError(f"unknown precision {spec!r}: use one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if spec == "fp16" and device.type == "cpu":
        raise ValueError("fp16 on the CPU is not supported: use bf16 or fp32")
    return _DTYPES[spec]


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the networks' convolution weights on `device`. Channels-last on a CUDA GPU, where convolutions
    then run in the layout its tensor cores read (usual practice; not measured here: no GPU). The ordinary layout
    elsewhere: on the CPU channels-last decoders trained slower (RevDist Lite2, 25-29 against 41 images/s); the
    encoders switch their own activations to channels-last there (backbones.py), where it is faster."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """The networks' forward passes in `dtype` (nothing changes for None or on the meta device)."""
    if dtype is None or device.type == "meta":
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device) -> AbstractContextManager:
    """Autocast off, for distances whose |q|^2 + |k|^2 - 2 q.k would cancel in half precision."""
    if device.type not in ("cpu", "cuda", "mps"):
        return nullcontext()
    return torch.autocast(device.type, enabled=False)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters (or, without any, its buffers) are; the CPU for an empty module."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """cuda:0 (NVIDIA H200), or cpu."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated on a CUDA device since the process began (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
