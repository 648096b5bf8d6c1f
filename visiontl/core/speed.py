"""CPU speed settings visiontl applies itself: allocator, memory format, precision, compile.

glibc's default allocator returns freed memory to the OS and page-faults it back every step;
channels_last speeds up CNN training; bf16 autocast is slower on a CPU without native bf16 units.
So: the allocator is tuned once in the process that trains, CNNs use channels_last, and bf16 is
only used where the CPU has native bf16 instructions and a timing shows it faster. What each
setting measured on the project's machine is in docs/concepts/speed.md and ``benchmarks/results/speed.md``.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "auto_precision",
    "channels_last_input",
    "has_native_bf16",
    "is_cnn",
    "measure_bf16_speedup",
    "tune_allocator",
]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory instead of returning it to the OS


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Stop glibc from unmapping and re-faulting tensor memory every step (once per process).

    Sets ``M_MMAP_MAX=0`` and a 1 GiB ``M_TRIM_THRESHOLD`` through ``mallopt``: large buffers come
    from the heap and stay there between steps. Peak RSS grows by 10-20 %. Disable with
    ``VISIONTL_TUNE_MALLOC=0``; a no-op where glibc is not the allocator.

    Returns:
        Whether the setting was applied.
    """
    if os.environ.get("VISIONTL_TUNE_MALLOC", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name or "libc" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc allocator tuned: %s", ok)
    return ok


@functools.lru_cache(maxsize=1)
def has_native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16 on x86)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _step_time(model: nn.Module, x: torch.Tensor, bf16: bool, steps: int) -> float:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().sum()
        loss.backward()

    step()  # warm-up (kernel selection, allocator)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def channels_last_input(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """A 4-D batch in NHWC memory (what a channels_last CNN wants); anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.dim() == 4 else x


def measure_bf16_speedup(model: nn.Module, input_shape: tuple[int, ...], channels_last: bool = False,
                         steps: int = 3) -> float:
    """Time training steps (forward + backward) in float32 and under bf16 autocast on a copy of
    ``model``; returns float32 time / bf16 time (> 1: bf16 is faster)."""
    probe = copy.deepcopy(model).train()
    x = torch.randn(*input_shape)
    if channels_last:
        probe.to(memory_format=torch.channels_last)
        x = channels_last_input(x)
    fp32 = _step_time(probe, x, False, steps)
    bf16 = _step_time(probe, x, True, steps)
    return fp32 / bf16


def auto_precision(model: nn.Module | None = None, input_shape: tuple[int, ...] | None = None,
                   channels_last: bool = False, threshold: float = 1.15, accelerator: Any = "auto") -> str:
    """Lightning ``precision`` for the device ``accelerator`` names and this model.

    On a GPU :func:`visiontl.core.devices.default_precision` (``bf16-mixed`` where supported, else
    ``16-mixed``). On a CPU, measured, never assumed: ``bf16-mixed`` only when it has native bf16
    instructions AND a short timing of ``model`` at ``input_shape`` shows bf16 autocast at least
    ``threshold`` times faster (the gain differs by architecture: see docs/concepts/speed.md); else ``32-true``.
    """
    from visiontl.core.devices import default_precision, device_kind

    chosen = default_precision(device_kind(accelerator))
    if chosen is not None:
        return chosen
    if model is None or input_shape is None or not has_native_bf16():
        return "32-true"
    speedup = measure_bf16_speedup(model, input_shape, channels_last)
    log.info("bf16 autocast speed-up measured on this CPU: x%.2f", speedup)
    return "bf16-mixed" if speedup >= threshold else "32-true"


def is_cnn(model: nn.Module) -> bool:
    """Whether channels_last helps: the model's work is 2-D convolutions (not a transformer)."""
    convs = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    attention = sum(1 for m in model.modules() if type(m).__name__ in ("Attention", "MultiheadAttention"))
    return convs > 2 and attention == 0
