"""Helpers of the hostile suite (``tests/test_hostile_*.py``): drive the real ``visiontl`` command
and check that a failure is short, names what failed, and exits non-zero.

``run_cli`` calls :func:`visiontl.cli.commands.main` in this process (the same dispatch, error handling and
messages as the console script, without a new interpreter per case); ``run_cli_subprocess`` runs
``python -m visiontl`` for the cases that must be seen from outside (tracebacks, exit codes).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Result", "assert_one_line_failure", "run_cli", "run_cli_subprocess"]

MAX_LINES = 3


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(*argv: str | os.PathLike[str]) -> Result:
    """``visiontl ARGV`` in this process: exit code, stdout and stderr."""
    from visiontl.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return Result(rc, out.getvalue(), err.getvalue())


def run_cli_subprocess(*argv: str | os.PathLike[str], env: dict[str, str] | None = None,
                       cwd: str | os.PathLike[str] | None = None, timeout: float = 600) -> Result:
    """``python -m visiontl ARGV`` in a new process (warnings ignored, as a user's shell shows them once)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "visiontl", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_failure(result: Result, *names: str | os.PathLike[str], rc: int | None = None) -> str:
    """A failure as users must see it: a non-zero exit (``rc`` when given), at most three lines on
    stderr, no traceback, and every one of ``names`` (a file, field or value) in the message.
    Returns the message."""
    assert result.rc != 0, f"exit 0 for a failure; stdout: {result.out[-500:]!r} stderr: {result.err[-500:]!r}"
    if rc is not None:
        assert result.rc == rc, (result.rc, result.err)
    assert "Traceback" not in result.err, result.err[-3000:]
    lines = result.err_lines
    assert 1 <= len(lines) <= MAX_LINES, f"{len(lines)} lines on stderr:\n{result.err[-3000:]}"
    message = "\n".join(lines)
    for name in names:
        text = str(name) if not isinstance(name, Path) else str(name)
        assert text in message or Path(text).name in message, f"{text!r} not named in: {message}"
    return message
