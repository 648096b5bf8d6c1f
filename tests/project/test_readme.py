"""Every number the README and Get started give about the demo comes from its committed result file.

``benchmarks/demo.py`` measures ``visiontl demo`` and writes ``benchmarks/results/demo.{csv,json}``;
the docs' demo tables and the one timing claim are generated from them (``--docs``). This fails when
a table or the timing was edited by hand, or the results changed without the docs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _demo_bench():
    spec = importlib.util.spec_from_file_location("demo_bench", ROOT / "benchmarks" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_show_the_measured_demo() -> None:
    bench = _demo_bench()
    rows, meta = bench.read()
    assert [r["strategy"] for r in rows] == list(meta["strategies"]) == list(meta["defaults"]["strategies"])
    expected = bench.blocks(rows, meta)
    for doc, path in bench.DOCS.items():
        text = path.read_text(encoding="utf-8")
        for name, body in expected.items():
            if name.startswith(doc):
                assert bench.current(text, name) == body, f"{path.name}: demo-{name} differs from demo.csv"
    readme = bench.DOCS["readme"].read_text(encoding="utf-8")
    assert len(re.findall(r"\d+(?:\.\d+)? minutes?", readme)) == 1  # the one timing claim, measured


def test_the_demo_defaults_are_what_was_measured() -> None:
    from visiontl.cli.demo import DEFAULTS

    _, meta = _demo_bench().read()
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULTS.items()} == meta["defaults"]


def test_a_hand_edit_is_caught() -> None:
    bench = _demo_bench()
    rows, meta = bench.read()
    body = bench.blocks(rows, meta)["readme"]
    text = bench.rewrite(bench.DOCS["readme"].read_text(encoding="utf-8"), "readme", body.replace("0.", "9.", 1))
    assert bench.current(text, "readme") != body
