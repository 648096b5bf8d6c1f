"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Nothing visiontl writes (reports, caches, exports) is ever left half-written at its final path:
a crash leaves either the old file or no file, plus at most a ``.tmp`` sibling that the next
write replaces.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visiontl.core.errors import WriteError, describe_os_error

__all__ = ["CSV_FORMULA_PREFIXES", "atomic_dir", "atomic_path", "cache_dir_problem", "csv_dict_rows", "csv_dict_writer",
           "csv_safe", "csv_unescape", "csv_writer", "current_umask", "default_cache_dir", "fsync_dir", "fsync_file",
           "read_manifest", "remove_stale_temps", "write_bytes", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Args:
        path: final destination.
        suffix: suffix for the temporary file (defaults to the destination's, so that libraries
            which pick a format from the extension, like matplotlib, still work).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix if suffix is not None else path.suffix,
            dir=path.parent,
        )
    except OSError as err:  # no folder can be made there, or no file created in it
        raise WriteError(err.errno, f"could not write {path}: cannot create a file in {path.parent} "
                                    f"({describe_os_error(err)}); choose another folder") from err
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the final file
    try:
        try:
            yield tmp_path
            fsync_file(tmp_path)  # the bytes are on the disk before the name points at them
            os.replace(tmp_path, path)
        except OSError as err:
            if WriteError.wraps(err):
                raise WriteError(err.errno, f"could not write {path}: {describe_os_error(err)}; "
                                 f"{'the previous file is kept as it was' if path.exists() else 'nothing was written'}"
                                 f"; free space or choose another folder") from err
            raise
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to the disk (a full disk shows here, not after the rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def default_cache_dir(check: bool = True) -> Path:
    """visiontl's cache (built datasets, features): ``$VISIONTL_CACHE`` or ``~/.cache/visiontl``.

    With ``check`` (what every writer of the cache gets) the folder is created if needed and
    checked once per process: a file there, or a folder this process cannot write to, is one
    :class:`~visiontl.core.errors.WriteError` naming it (``VISIONTL_CACHE=PATH is a file: point it at a
    writable folder``), never a ``PermissionError`` traceback from deep inside a cache."""
    env = os.environ.get("VISIONTL_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "visiontl"
    return _usable_cache_dir(path, env) if check else path


_CACHE_CHECKED: set[str] = set()


def _cache_name(path: Path, env: str | None) -> tuple[str, str]:
    """How a cache problem names the folder, and what to do about it."""
    if env:
        return f"VISIONTL_CACHE={env}", "point it at a writable folder"
    return f"the cache folder {path}", "set VISIONTL_CACHE to a writable folder"


def cache_dir_problem(path: str | os.PathLike[str], env: str | None = None) -> str | None:
    """Why ``path`` cannot be visiontl's cache, in one line (None when it can, as far as can be
    told without writing: :func:`default_cache_dir` also writes a probe). Creates nothing."""
    path = Path(path)
    name, fix = _cache_name(path, env)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            what = "a dangling symlink" if not path.exists() else "a file"
            return f"{name} is {what}, not a folder: {fix}"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{name} is not writable (permission denied): {fix}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{name} cannot be created ({parent} is a file): {fix}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{name} cannot be created ({parent} is not writable): {fix}"
    return None


def _usable_cache_dir(path: Path, env: str | None) -> Path:
    import errno

    if str(path) in _CACHE_CHECKED:
        return path
    problem = cache_dir_problem(path, env)
    if problem is not None:
        code = errno.ENOTDIR if " a file" in problem or "symlink" in problem else errno.EACCES
        raise WriteError(code, problem)
    name, fix = _cache_name(path, env)
    try:  # what os.access cannot tell (a read-only mount seen as root, a full disk, ACLs): try it
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise WriteError(err.errno or errno.EACCES, f"{name} is not writable ({describe_os_error(err)}): {fix}") \
            from err
    _CACHE_CHECKED.add(str(path))
    return path


# -- CSV files that are safe to open in a spreadsheet ---------------------------------------------
# Every CSV visiontl writes goes through csv_writer / csv_dict_writer: a text cell that a spreadsheet
# would run as a formula (CSV injection: a class or file named "=cmd|' /C calc'!A0") is written with
# a leading single quote, as OWASP advises; numbers, and text that reads as a plain number ("-0.5"),
# are written as they are. The escape is reversible (csv_unescape), and visiontl unescapes the CSVs it
# reads back itself (splits.csv through visiontl.data.layout.read_csv_rows, a bench's results.csv).

CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a text cell as a formula."""

_CSV_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _csv_needs_quote(text: str) -> bool:
    # the quotes already in front count for nothing, so that escaping is one-to-one: "'=x" is
    # written "''=x" and reads back as "'=x"
    body = text.lstrip("'")
    return body[:1] != "" and body[:1] in CSV_FORMULA_PREFIXES and _CSV_NUMBER.fullmatch(body) is None


def csv_safe(value: Any) -> Any:
    """``value`` as a CSV cell that a spreadsheet shows as text, never runs as a formula.

    Text (a ``str`` or a path) that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return gets a leading ``'``; numbers and numeric text (``-0.5``, ``+1e-3``) are left as they
    are, and so is any other value. :func:`csv_unescape` reverses it exactly.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and _csv_needs_quote(value):
        return "'" + value
    return value


def csv_unescape(value: Any) -> Any:
    """The value :func:`csv_safe` was given, from the cell it wrote (other values unchanged)."""
    if isinstance(value, str) and value.startswith("'") and _csv_needs_quote(value):
        return value[1:]
    return value


class _SafeCsvWriter:
    """``csv.writer`` whose cells go through :func:`csv_safe`."""

    def __init__(self, f: Any, dialect: Any = "excel", **fmtparams: Any) -> None:
        self._writer = csv.writer(f, dialect, **fmtparams)
        self.dialect = self._writer.dialect

    def writerow(self, row: Any) -> Any:
        return self._writer.writerow([csv_safe(v) for v in row])

    def writerows(self, rows: Any) -> None:
        for row in rows:
            self.writerow(row)


class _SafeDictWriter(csv.DictWriter):
    """``csv.DictWriter`` whose cells (header included) go through :func:`csv_safe`."""

    def writerow(self, rowdict: Any) -> Any:
        return super().writerow({k: csv_safe(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts: Any) -> None:
        for row in rowdicts:
            self.writerow(row)


def csv_writer(f: Any, dialect: Any = "excel", **fmtparams: Any) -> Any:
    """``csv.writer(f, ...)`` that escapes formula-like text cells (:func:`csv_safe`)."""
    return _SafeCsvWriter(f, dialect, **fmtparams)


def csv_dict_writer(f: Any, fieldnames: Any, **kwargs: Any) -> csv.DictWriter:
    """``csv.DictWriter(f, fieldnames, ...)`` that escapes formula-like text cells (:func:`csv_safe`)."""
    return _SafeDictWriter(f, fieldnames, **kwargs)


def csv_dict_rows(f: Any, **kwargs: Any) -> list[dict[Any, Any]]:
    """``list(csv.DictReader(f, ...))`` with the cells (and column names) :func:`csv_safe` escaped
    read back as they were given."""
    return [{csv_unescape(k): csv_unescape(v) for k, v in row.items()} for row in csv.DictReader(f, **kwargs)]

