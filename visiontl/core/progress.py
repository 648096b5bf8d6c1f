"""Progress bars: drawn on a terminal, never into a notebook's saved output, a log file or CI.

Every bar of the package (the step bar of a quiet fit, feature passes, the data check, int8
sensitivity...) comes from :func:`progress_bar`, which follows one rule, :func:`show_progress`:

- on an interactive terminal (standard error is a TTY) a bar is drawn;
- anywhere else (a Jupyter kernel, whose output streams are not TTYs; output redirected to a file;
  CI) no bar is drawn: a notebook's cells keep their answer and nothing else, and a log file holds
  no carriage-return residue;
- ``VISIONTL_PROGRESS=1`` draws bars anywhere (in Jupyter: a widget bar where ``ipywidgets`` is
  installed, a text bar otherwise), ``VISIONTL_PROGRESS=0`` never draws them.

A disabled bar is still a working ``tqdm`` object (``update``, ``set_postfix``, ``close`` do
nothing), so callers need no second code path. Nothing here changes state outside the bar.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["progress_bar", "show_progress"]

ENV = "VISIONTL_PROGRESS"


def show_progress() -> bool:
    """Whether bars are drawn here: ``VISIONTL_PROGRESS`` (``1``/``0``) when set, otherwise only when
    standard error is an interactive terminal (see the module docstring)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """A ``tqdm`` bar (same arguments), disabled by the caller's ``disable`` or by :func:`show_progress`."""
    if disable or not show_progress():
        from tqdm.std import tqdm

        return tqdm(iterable, disable=True, **kwargs)
    import warnings

    with warnings.catch_warnings():  # tqdm.auto's advice to install ipywidgets: the text bar works without
        warnings.filterwarnings("ignore", message=r".*IProgress not found.*")
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(iterable, disable=False, **kwargs)
