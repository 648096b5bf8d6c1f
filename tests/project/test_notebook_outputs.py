"""The committed notebooks' outputs hold the answer and nothing else (issue 33).

A reader on the web sees what a cell printed and plotted: no standard-error output at all (Lightning's
``GPU available`` lines and tips, its notices, warnings, progress bars), no logging lines or
Lightning banners in standard output either, no progress-bar residue, and no path of the machine
that ran it (``/tmp/...``, ``/home/...``, ``site-packages``): a notebook prints paths relative to its
work directory. A warning a notebook means to show is caught and printed by the cell.
The library is quiet by default where the notebooks call it (``fine_tune``, ``distill``, the bench...;
:mod:`visiontl.core.quiet`, :mod:`visiontl.core.progress`), so a user's own notebook is as clean.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))

BANNERS = re.compile(
    r"(GPU available:|TPU available:|HPU available:|IPU available:|\N{ELECTRIC LIGHT BULB}|LOCAL_RANK|"
    r"Seed set to \d|`Trainer\.(fit|validate|test|predict)` stopped|Restoring states from|Restored all states|"
    r"configure_callbacks|\| Name\s+\| Type|Trainable params|Non-trainable params|tensorboardX|litlogger|litmodels)"
)
"""Lightning's banner, tips, notices and model summary."""

LOG_LINES = re.compile(
    r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)[:\s]"  # a logging handler's default formats
    r"|^\S+\.py:\d+: \w*(Warning|Deprecation)"  # a warning as warnings.showwarning prints it
    r"|^\[visiontl\] (strategy |\w+ features (cached in|loaded from|of the)|\w+ head fitted on|"
    r"epoch \d+: training groups|target BatchNorm:|retained task|pretrained - scratch:)",  # visiontl's INFO lines
    re.MULTILINE,
)
"""Logging lines in standard output: a record's default format, a printed warning, visiontl's INFO
records (shown only with ``verbose=True``)."""

PROGRESS = re.compile(r"\r|\d+%\|[^|]*\||\[\d+:\d+(<|, )|\d+(\.\d+)?(it|img|step|node|batch|tile)s?/s\]")
"""tqdm's residue: carriage returns, ``40%|████`` bars, ``[00:01<00:02`` clocks, rates."""

MACHINE_PATH = re.compile(
    r"(?<![\w.~])/(tmp|home|root|work|Users|private|var/folders|usr|opt|mnt|scratch)/"
    r"|site-packages|dist-packages|\b[A-Za-z]:\\\\?[\w.-]+\\"
)
"""An absolute path of the machine that ran the notebook (or of its Python installation)."""


def _texts(output: Any) -> list[str]:
    if output.get("output_type") == "stream":
        return [output.get("text", "")]
    data = output.get("data", {})
    texts = [data[key] for key in ("text/plain", "text/html", "text/markdown", "text/latex") if key in data]
    if output.get("output_type") == "error":
        texts += [output.get("evalue", ""), *output.get("traceback", [])]
    return [t if isinstance(t, str) else "".join(t) for t in texts]


def noise(nb: Any) -> list[str]:
    """Every problem of ``nb``'s outputs, as ``cell N: what: the line`` (empty: clean)."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                first = output.get("text", "").strip().splitlines() or [""]
                found.append(f"cell {index}: stderr output: {first[0][:120]!r}")
                continue
            for text in _texts(output):
                for what, pattern in (("Lightning banner", BANNERS), ("logging line", LOG_LINES),
                                      ("progress-bar residue", PROGRESS), ("machine path", MACHINE_PATH)):
                    match = pattern.search(text)
                    if match:
                        start = text.rfind("\n", 0, match.start()) + 1
                        end = text.find("\n", match.end())
                        found.append(f"cell {index}: {what}: {text[start:end if end >= 0 else None][:120]!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_are_clean(path: Path) -> None:
    problems = noise(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def _notebook(*outputs: Any) -> Any:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("pass", outputs=list(outputs)))
    return nb


def _stdout(text: str) -> Any:
    return nbformat.v4.new_output("stream", name="stdout", text=text)


@pytest.mark.parametrize(("output", "what"), [
    (nbformat.v4.new_output("stream", name="stderr", text="anything at all\n"), "stderr output"),
    (_stdout("GPU available: False, used: False\n"), "Lightning banner"),
    (_stdout("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing litlogger\n"), "Lightning banner"),
    (_stdout("`Trainer.fit` stopped: `max_steps=40` reached.\n"), "Lightning banner"),
    (_stdout("INFO:pytorch_lightning.utilities.rank_zero:GPU available\n"), "logging line"),
    (_stdout("val_acc 0.9\n[visiontl] strategy Probe(lr=0.01): 291 of 372,979 parameters train now\n"), "logging line"),
    (_stdout("[visiontl] train features cached in cache/features/ab12\n"), "logging line"),
    (_stdout("guard.py:220: UserWarning: [visiontl] divergence guard\n"), "logging line"),
    (_stdout("int8 sensitivity:  50%|█████     | 8/16 [00:01<00:00,  6.94node/s]\n"), "progress-bar residue"),
    (_stdout("Checking images: 12 img\r"), "progress-bar residue"),
    (_stdout("run dir: /tmp/visiontl-quickstart-f8nekv6f/runs\n"), "machine path"),
    (_stdout("cached in /root/.cache/visiontl/features/ab12\n"), "machine path"),
    (_stdout("/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21\n"), "machine path"),
    (nbformat.v4.new_output("execute_result", data={"text/plain": "PosixPath('/home/me/runs')"}, execution_count=1),
     "machine path"),
])
def test_each_kind_of_noise_is_caught(output: Any, what: str) -> None:
    """The check can fail: each kind of line the old notebooks carried is reported."""
    problems = noise(_notebook(output))
    assert problems and what in problems[0], problems


def test_clean_lines_pass() -> None:
    """Answers, relative paths, a demonstrated warning printed by the cell, a percentage in prose."""
    assert noise(_notebook(_stdout(
        "val_acc 0.967 (40 steps)\nrun dir: runs/test_resnet-full/version_0\n"
        "warning: [visiontl] divergence guard: collapse: class 1 took 100% of the predictions\n"
        "[visiontl] data check: 450 image(s) have a side below 32 px\n"
        "int8 / float throughput at batch 32: 1.9 | 50% of the labels\n"
        "  stem              7,472  trains  lr=0.000168\n"
    ))) == []
