"""The one reader of checkpoints and PEFT checkpoints: a checkpoint is data, it never chooses what to import.

Every command that reads a ``.ckpt`` (``export``, ``wise-ft``, ``distill``, ``validate --ckpt_path``,
the run reports) reads it here, and every ``.peft.safetensors`` file has its header checked here
before safetensors sees it. A file that cannot be used is refused with one
:class:`CheckpointError` naming the file, the field or tensor and what to do, never a raw
``torch`` / ``safetensors`` / ``json`` exception:

- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` of a file (not a folder, not missing),
  with a pickled payload named as such (the ``GLOBAL`` it asked for) and nothing of it run; the top
  level must be a dict, its ``state_dict`` a dict of tensors, its ``hyper_parameters`` a dict.
- :func:`task_spec`: the hyper-parameters a task is rebuilt from: a backbone that is a plain timm
  model name (never a path or a hub address) and a strategy that is a registered one's recorded
  dict (nothing is imported for it).
- :func:`read_safetensors_header`: the 8-byte header length bounded by the file and
  :data:`MAX_HEADER_BYTES`, a JSON header, known dtypes, non-negative shapes whose byte counts
  match their ``data_offsets``, and those inside the file.
- :func:`checkpoint_record`: what a visiontl task recorded in its checkpoint (validation metrics,
  confusion, base weights), with the state dict when asked.
- :func:`model_state` / :func:`with_model_state`: the network's weights inside a task's state
  dict (the ``model.`` prefix is written here and nowhere else).
- :func:`kept_model`: a copy of the network a run keeps (its best checkpoint's weights), with a
  parameter-efficient strategy's changes merged in when asked.

And the one writer: :func:`save_checkpoint` (serialised, then written to a temporary file in the
destination folder, fsynced and renamed) and :class:`AtomicCheckpointIO`, Lightning's checkpoint
writer made atomic in the destination folder (every visiontl task installs it): a full disk leaves
the previous file as it was and stops with one line naming the last good checkpoint.
"""

from __future__ import annotations

import inspect

import copy
import difflib
import io
import json
import math
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from visiontl.core import files
from visiontl.core.errors import WriteError, describe_os_error, one_line
from visiontl.models.weights import WeightsError

__all__ = ["MAX_HEADER_BYTES", "MODEL_PREFIX", "AtomicCheckpointIO", "CheckpointError", "CheckpointWriteError",
           "check_backbone_name", "checkpoint_record", "install_atomic_writer", "kept_model", "last_good_checkpoint",
           "looks_like_safetensors", "model_state", "read_checkpoint", "read_safetensors_header", "save_checkpoint",
           "task_spec", "weights_only_kwargs", "with_model_state"]

MODEL_PREFIX = "model."
"""The network's weights in a task's state dict are ``model.<name>`` (the task holds it as ``self.model``)."""

MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header read (safetensors' own limit)."""

# bytes per element of the dtypes a safetensors file may hold (and torch can load)
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class CheckpointError(WeightsError):
    """A checkpoint or PEFT checkpoint that cannot be read or used; the message names the file."""


# --------------------------------------------------------------------------- files
def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; give the path of a .ckpt file or a run directory.")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file; give the .ckpt file inside it "
                              f"(e.g. {path / 'checkpoints' / 'best.ckpt'}) or the run directory itself where the "
                              f"command takes one.")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} cannot be read (permission denied).")


def _unpickling_detail(err: BaseException) -> str:
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                            "Please file an issue"))]
    return one_line(lines[0] if lines else type(err).__name__, 200)


def _not_a_checkpoint(path: Path, what: str, detail: str) -> CheckpointError:
    if looks_like_safetensors(path):
        return CheckpointError(f"{what} {path} is a safetensors file (a PEFT checkpoint or weights), not a Lightning "
                               f".ckpt; give the run's checkpoints/best.ckpt, or give the .peft.safetensors file to a "
                               f"command that takes one (export, distill).")
    return CheckpointError(f"{what} {path} is not a torch checkpoint (corrupt, truncated or another format: {detail}); "
                           f"give a .ckpt written by visiontl.")


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, mmap: bool = False,
                    what: str = "checkpoint") -> dict[str, Any]:
    """A visiontl (Lightning) checkpoint's top-level dict, read as data.

    Read with ``torch.load(weights_only=True)``: a file that pickles Python objects is refused
    before anything in it runs. The top level must be a dict with a ``state_dict`` (a dict of
    tensors by name) and ``hyper_parameters`` (a dict).

    Args:
        path: the ``.ckpt`` file.
        map_location: where the tensors go.
        mmap: memory-map the file (a large checkpoint read for a few entries costs little).
        what: how the file is called in messages (``checkpoint``, ``--ckpt-path``...).

    Raises:
        CheckpointError: missing, a folder, unreadable, not a torch checkpoint, pickled objects,
            or not shaped like a visiontl checkpoint; one line naming the file.
    """
    path = Path(path)
    _check_file(path, what)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read ({err.strerror or err}).") from err
    if not magic:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): a checkpoint whose writing was interrupted, or not "
                              f"a checkpoint; give another one (e.g. the run's checkpoints/last.ckpt).")
    try:  # memory-mapped only where torch can (its zip format); other bytes get torch's own diagnosis
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and magic == b"PK\x03\x04")
    except MemoryError:
        raise
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if found or "global" in str(err).lower():
            named = f" (it asks for {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects{named}, not only tensors and plain data; visiontl reads "
                f"checkpoints as data only and ran nothing of it. Use a checkpoint written by visiontl, or load it "
                f"yourself where you trust it and save its state_dict and hyper_parameters with torch.save."
            ) from err
        raise _not_a_checkpoint(path, what, _unpickling_detail(err)) from err
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read ({err.strerror or err}).") from err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError... on bad bytes
        raise _not_a_checkpoint(path, what, f"{type(err).__name__}: {one_line(err, 200)}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint (a dict with state_dict "
                              f"and hyper_parameters); give a .ckpt written by visiontl.")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        kind = "no state_dict" if state is None else f"a state_dict that is a {type(state).__name__}"
        raise CheckpointError(f"{what} {path} has {kind}, not a dict of tensors: not a visiontl ClassificationTask "
                              f"checkpoint; give a .ckpt written by visiontl.")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{what} {path}: state_dict entry {str(bad[0])[:80]!r} is a {type(bad[1]).__name__}, "
                              f"not a tensor; the checkpoint is damaged or not a visiontl one.")
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict):
        kind = "no hyper_parameters" if hp is None else f"hyper_parameters that are a {type(hp).__name__}"
        raise CheckpointError(f"{what} {path} has {kind}, not a dict: not a visiontl ClassificationTask checkpoint "
                              f"(a task's checkpoint records how to rebuild its model); give a .ckpt written by "
                              f"visiontl.")
    return ckpt


# --------------------------------------------------------------------------- hyper-parameters
def check_backbone_name(name: Any, where: str) -> str:
    """``name`` when it is a plain timm model name (letters, digits, ``_ . -``; no path, no hub
    address); else :class:`CheckpointError` naming ``where`` (with close names for a typo)."""
    import timm

    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: its backbone is {name!r}, not a timm model name.")
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise CheckpointError(f"{where}: its backbone {one_line(name, 120)!r} is not a timm model name (a checkpoint "
                              f"names a model, never a path or hub address); the file is damaged or was edited.")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CheckpointError(f"{where}: its backbone {name!r} is not a timm model of this timm "
                              f"({timm.__version__}).{hint} Upgrade timm if it is newer, or fix the name.")
    return name


def task_spec(hp: Any, where: str) -> tuple[dict[str, Any], Any]:
    """The hyper-parameters (a copy, without ``strategy``) and the strategy a recorded task is
    rebuilt from, checked: a plain timm backbone name, a registered strategy (recorded as its
    ``{"class_path", "init_args"}`` or ``{"name", ...}`` dict; nothing is imported for it),
    ``num_classes`` a positive integer. ``where`` names the file in messages."""
    from visiontl.strategies import StrategyError, get_strategy

    if not isinstance(hp, dict):
        raise CheckpointError(f"{where}: its hyper_parameters are a {type(hp).__name__}, not a dict.")
    hp = dict(hp)
    if "backbone" not in hp:
        raise CheckpointError(f"{where}: its hyper_parameters have no backbone: not a visiontl ClassificationTask "
                              f"checkpoint.")
    check_backbone_name(hp["backbone"], where)
    k = hp.get("num_classes")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise CheckpointError(f"{where}: its num_classes is {one_line(repr(k), 80)}, not a positive integer.")
    names = hp.get("class_names")
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where}: its class_names are {one_line(repr(names), 80)}, not a list of names.")
    spec = hp.pop("strategy", None)
    if spec is None:
        spec = {"name": "probe"}
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: its strategy is recorded as a {type(spec).__name__} "
                              f"({one_line(repr(spec), 80)}), not the {{'class_path', 'init_args'}} dict visiontl "
                              f"writes; the file is damaged or was edited.")
    if "class_path" in spec and not isinstance(spec.get("init_args") or {}, dict):
        raise CheckpointError(f"{where}: its strategy's init_args are a {type(spec['init_args']).__name__}, not a "
                              f"dict.")
    try:
        strategy = get_strategy(spec, trusted=False)
    except StrategyError as err:
        raise CheckpointError(f"{where}: {err}") from err
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise CheckpointError(f"{where}: its strategy {one_line(repr(spec), 120)} cannot be rebuilt "
                              f"({type(err).__name__}: {one_line(err, 160)}).") from err
    return hp, strategy


# --------------------------------------------------------------------------- safetensors
def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte header length, then ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def read_safetensors_header(path: str | os.PathLike[str], what: str = "PEFT checkpoint"
                            ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries (``dtype``, ``shape``, ``data_offsets``) and the metadata of a
    safetensors file, checked without handing the file to safetensors.

    Raises:
        CheckpointError: truncated, a header length beyond the file or :data:`MAX_HEADER_BYTES`,
            a header that is not JSON, metadata that are not strings, an unknown dtype, an
            impossible shape or data outside the file; one line naming the file and the tensor.
    """
    path = Path(path)
    _check_file(path, what)
    size = path.stat().st_size
    redo = "copy it again or write it again from its run"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{what} {path} is truncated ({size} bytes; a safetensors file starts with an "
                                      f"8-byte header length); {redo}.")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise CheckpointError(f"{what} {path} declares a {length}-byte header but the file has {size} bytes "
                                      f"(limit {MAX_HEADER_BYTES}): truncated or not a safetensors file; {redo}.")
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read ({err.strerror or err}).") from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{what} {path} has a header that is not JSON ({one_line(err, 120)}): corrupt or not a "
                              f"safetensors file; {redo}.") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {path} has a header that is a JSON {type(header).__name__}, not an object: "
                              f"corrupt; {redo}.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{what} {path} has __metadata__ that are not a map of strings: corrupt; {redo}.")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{what} {path}: tensor {name!r} has no dtype / shape / data_offsets entry.")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{what} {path}: tensor {name!r} has dtype {one_line(repr(dtype), 40)}, not one of "
                                  f"{', '.join(SAFETENSORS_DTYPES)}.")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{what} {path}: tensor {name!r} has an impossible shape "
                                  f"{one_line(repr(shape), 80)} (sizes must be non-negative integers); corrupt.")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointError(f"{what} {path}: tensor {name!r} has data_offsets {one_line(repr(offsets), 80)} "
                                  f"outside the file's {data_bytes} data bytes: truncated or corrupt; {redo}.")
        needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if needed != offsets[1] - offsets[0]:
            raise CheckpointError(f"{what} {path}: tensor {name!r} has shape {shape} ({dtype}, {needed} bytes) but "
                                  f"{offsets[1] - offsets[0]} bytes of data: an impossible shape; corrupt.")
    return header, meta


# --------------------------------------------------------------------------- records and weights
def checkpoint_record(path: str | os.PathLike[str] | None, state_dict: bool = False) -> dict[str, Any] | None:
    """What a checkpoint saved by a visiontl task records: ``val_metrics`` and ``val_confusion``
    at the time it was saved (plus ``state_dict`` when asked), or None for no file, other
    checkpoints and a record not shaped as visiontl writes it.

    Read by :func:`read_checkpoint` (memory-mapped, so a large checkpoint costs little): a file that
    is not a readable checkpoint is a one-line :class:`CheckpointError`.
    """
    if not path or not Path(path).is_file():
        return None
    ckpt = read_checkpoint(path, mmap=True)
    record = ckpt.get("visiontl")
    if not isinstance(record, dict) or not isinstance(record.get("val_metrics"), dict) or not record["val_metrics"]:
        return None
    return {**record, "state_dict": ckpt["state_dict"]} if state_dict else dict(record)


def model_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights of a task's state dict, without the :data:`MODEL_PREFIX`."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}


def with_model_state(state_dict: dict[str, torch.Tensor], network: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task's state dict with the network's weights replaced by ``network`` (kept on the CPU)."""
    return {**state_dict, **{f"{MODEL_PREFIX}{k}": v.detach().cpu() for k, v in network.items()}}


def kept_model(trainer: Any, pl_module: Any, merge: bool = False) -> tuple[torch.nn.Module, dict[str, Any] | None, str]:
    """A copy of the network a run keeps: its best checkpoint's weights where there is one, else the
    network as it is; with that checkpoint (None without one) and its path (``""``). ``merge``
    folds a parameter-efficient strategy's changes in (a plain network, as export deploys)."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    model = copy.deepcopy(pl_module.model)
    ckpt = None
    if best and Path(best).is_file():
        ckpt = read_checkpoint(best)
        try:
            model.load_state_dict(model_state(ckpt["state_dict"]))
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {best} does not fit the model being trained "
                                  f"({one_line(err, 200)}).") from err
    if merge:
        model = pl_module.strategy.merge(model.eval())
    return model, ckpt, best


# --------------------------------------------------------------------------- writing
class CheckpointWriteError(WriteError):
    """A checkpoint that could not be written; the previous file at that path is intact."""


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``: writes are atomic, so every ``*.ckpt`` there
    is whole (temporaries start with a dot), the previous version of a failed one included."""
    found = [p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path``: serialised first (torch's zip writer reports a full disk as a
    ``RuntimeError``), then a temporary file in the destination folder, fsynced, renamed.

    Raises:
        CheckpointWriteError: the disk is full, read-only or not ours; the previous file is kept,
            and the message names the last good checkpoint beside it.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        files.write_bytes(target, buffer.getbuffer())
    except OSError as err:
        if not WriteError.wraps(err) and not isinstance(err, WriteError):
            raise
        kept = last_good_checkpoint(target.parent)
        previous = "the previous one is kept as it was" if target.exists() else "nothing was left half-written"
        if kept is not None:
            last = f"the last good checkpoint is {kept}. Free space and resume with --ckpt_path {kept}"
        else:
            last = "no checkpoint of this run was written. Free space (or choose another run directory) and run again"
        raise CheckpointWriteError(
            err.errno, f"could not write the checkpoint {target}: {describe_os_error(err)}; {previous}; {last}."
        ) from err
    return target


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes go through :func:`save_checkpoint`.

    Lightning's writer puts its temporary file in ``/tmp`` and moves it onto the run directory:
    across filesystems that move is a copy, and a full disk left ``best.ckpt`` truncated under its
    final name. Remote paths (``s3://``...) keep Lightning's object-storage writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, str(path).removeprefix("file://"))
        return None


def install_atomic_writer(trainer: Any) -> bool:
    """Use :class:`AtomicCheckpointIO` on ``trainer`` where it writes with Lightning's default
    ``TorchCheckpointIO``; returns whether it writes atomically now (a writer of the user's own is kept)."""
    strategy = getattr(trainer, "strategy", None)
    current = getattr(strategy, "checkpoint_io", None)
    if strategy is None or type(current) is not TorchCheckpointIO:
        return isinstance(current, AtomicCheckpointIO)
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def weights_only_kwargs(method: Callable[..., Any]) -> dict[str, Any]:
    """``{"weights_only": True}`` where the Trainer method takes it (Lightning >= 2.4)."""
    try:
        return {"weights_only": True} if "weights_only" in inspect.signature(method).parameters else {}
    except (TypeError, ValueError):
        return {}
