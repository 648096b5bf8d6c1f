"""Where a run computes, and the defaults that follow from it: precision, pinned memory, workers.

Each decision is a pure function of the device kind (``cuda``, ``mps`` or ``cpu``) and what that
device supports, so it is tested with the device faked; the callers pass what Lightning was asked
for (``--trainer.accelerator``), never assume the machine they were written on.

- **precision**: on CUDA ``bf16-mixed`` where the GPU has bf16 (Ampere and later), else
  ``16-mixed`` (Lightning adds the gradient scaler float16 needs); on a CPU float32 (bf16 only when
  asked for: :func:`visiontl.core.speed.auto_precision` measures whether it pays for a model); on
  Apple's MPS float32 (its mixed precision support varies by PyTorch release).
- **loaders**: pinned host memory only where batches are copied to a CUDA device; workers: one
  fewer than the cores, at most 4 on a CPU (the training process needs the rest) and at most 8
  feeding a GPU.
- **memory format**: channels_last for CNNs on every device (:func:`visiontl.core.speed.is_cnn`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["default_precision", "device_kind", "resolve_precision", "trainer_device_kind"]


def device_kind(accelerator: Any = "auto", *, cuda_available: bool | None = None,
                mps_available: bool | None = None) -> str:
    """``cuda``, ``mps`` or ``cpu`` for a Lightning ``accelerator`` flag (``auto``, ``gpu``,
    ``cuda``, ``mps``, ``cpu`` or an Accelerator object). ``auto`` and ``gpu`` take CUDA where it
    is available, then MPS; the availability arguments fake the device (tests)."""
    import torch

    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or "auto").lower()
    else:  # CUDAAccelerator, MPSAccelerator, CPUAccelerator
        name = type(accelerator).__name__.lower().removesuffix("accelerator")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if mps_available is None:
        mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name in ("auto", "gpu") and cuda):
        return "cuda"
    if name == "mps" or (name in ("auto", "gpu") and mps_available):
        return "mps"
    return "cpu"


def trainer_device_kind(trainer: Any) -> str:
    """The device kind a running trainer computes on (``cpu`` without a trainer)."""
    if trainer is None:
        return "cpu"
    try:
        kind = trainer.strategy.root_device.type
    except (AttributeError, RuntimeError):
        return "cpu"
    return kind if kind in ("cuda", "mps") else "cpu"


def default_precision(kind: str, *, bf16_supported: bool | None = None) -> str | None:
    """Lightning ``precision`` for a device kind; None on a CPU, where it is measured per model."""
    if kind == "cuda":
        if bf16_supported is None:
            import torch

            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16-mixed" if bf16_supported else "16-mixed"
    if kind == "mps":
        return "32-true"
    return None


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """A trainer's ``precision`` as given, or, where it is unset (None / ``auto``), the device's
    default (:func:`default_precision`; None on a CPU: Lightning's float32)."""
    if precision not in (None, "auto"):
        return precision
    return default_precision(device_kind(accelerator))
