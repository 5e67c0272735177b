"""Where and how the network runs: seeding, device, autocast precision and the input layout."""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

from .dataloader import normalise

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SEED_RANGE = "an integer from 0 to 2**32 - 1"  # NumPy's seed range


def is_seed(value) -> bool:
    """Whether NumPy, torch and random all accept `value` as a seed."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (call once at the start of a notebook, after the parameter
    checks); a seed NumPy cannot take raises a ValueError naming it first."""
    if not is_seed(seed):
        raise ValueError(f"seed={seed!r} is invalid: expected {SEED_RANGE}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use 'auto' or 'cpu'.")
    return resolved


def cpu_supports_bf16() -> bool:
    """True when this CPU computes in bf16 natively (AVX512-BF16 or AMX), where bf16 autocast runs
    VGG16 a few times faster than fp32. oneDNN also accepts bf16 on plain AVX-512 by converting,
    which trained MobileNetV2 twice as slowly as fp32 on a Xeon without AVX512-BF16, so that
    does not count."""
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in native:  # a torch without these probes: oneDNN's own answer
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(probe() for probe in native)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the autocast precision: "auto" is bf16 on CUDA or bf16-capable CPUs, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' is for CUDA only; on CPU use 'bf16' or 'fp32'.")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` ("fp32" disables it)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cache_dtype(precision: str) -> torch.dtype:
    """The dtype cached activations are kept in: bf16 on the reduced-precision paths (half the
    memory, what autocast computes anyway), fp32 otherwise."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Move to `device`; the reduced-precision paths run channels-last (faster oneDNN/cuDNN)."""
    model = model.to(device)
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device,
             precision: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 images -> the normalised float input on `device`, channels-last on the
    reduced-precision paths."""
    x = normalise(images.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if precision != "fp32" else x


def to_layout(x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Cached (B, C, h, w) activations on `device`, in the layout the model runs in."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if precision != "fp32" else x


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB: VmHWM of /proc/self/status on Linux
    (ru_maxrss survives exec, so a child would report its parent's peak), else ru_maxrss."""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # Unix only, and only needed without /proc
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
