"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Nothing visiontl writes (reports, caches, exports) is ever left half-written at its final path:
a crash leaves either the old file or no file, plus at most a ``.tmp`` sibling that the next
write replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "current_umask", "default_cache_dir", "read_manifest", "remove_stale_temps", "write_bytes", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Args:
        path: final destination.
        suffix: suffix for the temporary file (defaults to the destination's, so that libraries
            which pick a format from the extension, like matplotlib, still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix if suffix is not None else path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the final file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it becomes ``path`` only if the block succeeds.

    With ``replace``, an existing ``path`` is moved aside first and deleted once the new folder
    is in place, so a failure leaves the old folder (or none), never a mix. Without, the new
    folder is published only where nothing is at ``path`` yet (a rename that cannot overwrite a
    finished folder: content-addressed caches, where another process may have published the
    same entry first) and is discarded otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would stay on the final folder
    try:
        yield tmp
        if not replace:
            try:
                os.rename(tmp, path)  # fails if a (non-empty) folder is there: never replaces it
            except OSError:
                pass  # published by someone else (or a damaged entry sits there): the caller reads it
            return
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, or None when missing or unreadable (rebuild then)."""
    try:
        data = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries of ``path`` (``.NAME.tmp-PID-*``) left by processes that no longer run
    (a killed export or build); a live writer's are kept. Returns what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue  # an old-style name (no pid) or a writer still at work
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux), so files written
    atomically get the same permissions as files written in place (a service user can read a model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def default_cache_dir() -> Path:
    """visiontl's cache (built datasets, features): ``$VISIONTL_CACHE`` or ``~/.cache/visiontl``."""
    env = os.environ.get("VISIONTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visiontl"
