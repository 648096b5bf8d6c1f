"""Progress bars are drawn on a terminal only (issue 33): a notebook's saved output, a log file or
CI never get carriage-return residue; ``VISIONTL_PROGRESS`` overrides the rule either way."""

from __future__ import annotations

import io

import pytest

from visiontl.core import progress
from visiontl.core.progress import progress_bar, show_progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "env", "shown"), [
    (True, None, True), (False, None, False),  # a terminal / a notebook kernel, a file, CI
    (False, "1", True), (True, "0", False),  # the user's choice wins
])
def test_bars_follow_the_terminal_unless_asked(tty: bool, env: str | None, shown: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty)
    monkeypatch.setattr(progress.sys, "stderr", stream)
    if env is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, env)
    assert show_progress() is shown
    bar = progress_bar(range(3), desc="work", file=stream, leave=False)
    assert list(bar) == [0, 1, 2]  # a disabled bar still iterates
    bar.set_postfix({"val_acc": "1.0"})
    bar.close()
    assert ("work" in stream.getvalue()) is shown


def test_the_caller_can_still_disable_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(True)
    monkeypatch.setattr(progress.sys, "stderr", stream)
    monkeypatch.delenv(progress.ENV, raising=False)
    with progress_bar(total=4, desc="small", disable=True, file=stream) as bar:
        bar.update(4)
    assert stream.getvalue() == ""
