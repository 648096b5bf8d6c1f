"""The one base class for failures a user can fix, and how a command reports them.

Every ``visiontl`` command ends a failure with one line (at most three): what failed, naming the
file, field or value, and what to do, with a non-zero exit. Errors raised for bad input derive from
:class:`UserError`; the command line prints their message and exits 2. ``--debug`` (or
``VISIONTL_DEBUG=1``) prints the traceback instead. Torch-free: ``visiontl.deploy.predict`` imports it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import NoReturn

__all__ = ["CommandParser", "UserError", "WriteError", "debug_enabled", "describe_os_error", "known_cause", "one_line"]

# errors of the destination, not of the program: the write is refused, the old file stays
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


class UserError(ValueError):
    """Bad input or a refused operation; the message names the file, field or value and the fix."""


class WriteError(OSError, UserError):
    """A file that could not be written (a full disk, a read-only folder); what was there is kept.

    ``WriteError(errno, message)``: an ``OSError`` with that errno whose text is the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def wraps(cls, err: BaseException) -> bool:
        """Whether ``err`` is a failure of the destination (full, read-only, no permission)."""
        return isinstance(err, OSError) and not isinstance(err, UserError) and err.errno in _WRITE_ERRNOS


def describe_os_error(err: OSError) -> str:
    """``no space left on the device`` rather than ``[Errno 28] No space left on device: '/x'``."""
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if err.errno in (errno.EROFS,):
        return "the filesystem is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (err.strerror or str(err)).rstrip(".").lower() if err.strerror else str(err)


def known_cause(err: BaseException) -> BaseException | None:
    """The first :class:`UserError` or failed write among ``err`` and its causes: jsonargparse and
    Lightning wrap what a class raised while it was built or run in errors of their own."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError) or WriteError.wraps(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def debug_enabled(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``VISIONTL_DEBUG`` set to a true value."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get("VISIONTL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: object, limit: int = 600) -> str:
    """A message folded onto one line (white space collapsed), cut at ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for visiontl's commands: a bad option is one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {one_line(message)} (`{self.prog} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2)
