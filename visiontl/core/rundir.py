"""Where a run's files go: the directory of the Trainer's first logger, else its root directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_dir"]


def run_dir(trainer: Any) -> Path:
    """The directory of this run (the logger's version folder, else ``default_root_dir``).

    Read from the logger, not ``trainer.log_dir``: that one broadcasts from rank 0 under DDP, a
    collective that hangs when only rank 0 asks (the report is written by rank 0 alone). On rank 0
    the two are the same folder."""
    logger = trainer.loggers[0] if trainer.loggers else None
    path = getattr(logger, "log_dir", None) if logger is not None else None
    if path is None and logger is not None:
        path = logger.save_dir
    return Path(path or trainer.default_root_dir)
