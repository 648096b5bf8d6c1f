"""``fine_tune`` is quiet by default (issue 33): what a notebook cell shows is what it prints.

Called with its defaults, a fit emits no Lightning banner (``GPU available``), tip or notice, no
information record (Lightning's or visiontl's: the strategy table, where features were cached), and
no progress bar where standard error is not a terminal; ``verbose=True`` brings the information
lines back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from visiontl import fine_tune

LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "pytorch_lightning.utilities.rank_zero",
           "visiontl")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("verbose", [None, True])
def test_fine_tune_shows_nothing_but_its_answer_by_default(verbose: bool | None, shapes_root: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISIONTL_PROGRESS", raising=False)
    handler = _Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        fine_tune(shapes_root, backbone="test_resnet", strategy="probe", pretrained=False, image_size=32, steps=3,
                  out=tmp_path, data_kwargs={"num_workers": 0}, **({} if verbose is None else {"verbose": verbose}))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    out, err = capfd.readouterr()
    shown = "\n".join([*handler.messages, out, err])
    if verbose:  # the information lines are there when asked for (so their absence below means something)
        assert "[visiontl] strategy" in shown and "[visiontl] train features" in shown, shown
    else:
        assert handler.messages == [], handler.messages
        for noise in ("GPU available", "Tip:", "configure_callbacks", "[visiontl]", "%|", "\r"):
            assert noise not in out + err, (noise, out + err)
    assert "Tip:" not in shown and "GPU available" not in shown  # never, verbose or not
