"""Loads the fixture generators ``tests/fixtures/<name>/generate.py`` (one per public dataset layout),
and the helpers they share."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

HERE = Path(__file__).parents[1] / "fixtures"  # tests/fixtures/<name>/generate.py


def load_fixture(name: str) -> ModuleType:
    """The generator module of ``tests/fixtures/<name>/``; ``module.make(root)`` writes the files."""
    path = HERE / name / "generate.py"
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth(rng: np.random.Generator, size: int | tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: a ``cells`` x ``cells`` grid upsampled bicubically to
    ``size`` (an int, or ``(height, width)``)."""
    h, w = (size, size) if isinstance(size, int) else size
    low = rng.random((cells, cells)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)), 0.0, 1.0)


def pick_classes(classes: int | Sequence[str], default: Sequence[str], known: Sequence[str],
                 dataset: str) -> tuple[str, ...]:
    """Class names, or a count of them (the defaults first, then the dataset's other real classes)."""
    if isinstance(classes, int):
        rest = [c for c in known if c not in default]
        return (*default, *rest)[:classes]
    unknown = set(classes) - set(known)
    if unknown:
        raise ValueError(f"not {dataset} classes: {sorted(unknown)}")
    return tuple(classes)
