"""Checkpoints written where they land: a temporary file in the destination folder, flushed and
fsynced, then renamed (:func:`visiontl._io.atomic_path`).

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives
in ``/tmp`` and is then *moved* onto the run directory: across filesystems that move is a copy,
and a full disk leaves ``best.ckpt`` truncated under its final name. :class:`AtomicCheckpointIO`
writes local checkpoints in the destination folder instead; a failed write leaves the previous
file as it was and no partial file, and stops the run with one line (:class:`CheckpointWriteError`)
naming what could not be written, where, why, and the last good checkpoint. Remote paths
(``s3://``...) keep Lightning's object-storage writer.

Every visiontl task installs it (:func:`install`) when the trainer uses Lightning's default
checkpoint writer; a writer of the user's own is left alone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from visiontl import _io
from visiontl.errors import WriteError, describe_os_error

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "install", "last_good_checkpoint"]


class CheckpointWriteError(WriteError):
    """A checkpoint that could not be written; the previous file at that path is intact."""


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``: writes are atomic, so every ``*.ckpt`` there
    is whole (temporaries start with a dot), the previous version of a failed one included."""
    found = [p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic in the destination folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        buffer = io.BytesIO()  # serialised first: torch's zip writer reports a full disk as a RuntimeError
        torch.save(checkpoint, buffer)
        try:
            _io.write_bytes(target, buffer.getbuffer())
        except OSError as err:
            if not WriteError.wraps(err) and not isinstance(err, WriteError):
                raise
            kept = last_good_checkpoint(target.parent)
            previous = "the previous one is kept as it was" if target.exists() else "nothing was left half-written"
            if kept is not None:
                last = f"the last good checkpoint is {kept}. Free space and resume with --ckpt_path {kept}"
            else:
                last = ("no checkpoint of this run was written. Free space (or choose another run directory) and run "
                        "again")
            raise CheckpointWriteError(
                err.errno, f"could not write the checkpoint {target}: {describe_os_error(err)}; {previous}; {last}."
            ) from err
        return None


def install(trainer: Any) -> bool:
    """Use :class:`AtomicCheckpointIO` on ``trainer`` where it writes with Lightning's default
    ``TorchCheckpointIO``; returns whether it did (a writer of the user's own is kept)."""
    strategy = getattr(trainer, "strategy", None)
    current = getattr(strategy, "checkpoint_io", None)
    if strategy is None or type(current) is not TorchCheckpointIO:
        return isinstance(current, AtomicCheckpointIO)
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
