"""Write the committed plots (and the pages built from CSV alone) of ``benchmarks/results`` again, without training.

Every benchmark script has a ``replot(results, out)`` function that reads its CSV files from
``results`` and writes its PNG (and, where the CSV holds everything the page says, its Markdown
page) into ``out``; the settings a CSV does not record (step budgets, the machine) default to
those of the committed run. This script calls them:

    python benchmarks/replot.py                     # every result, in place
    python benchmarks/replot.py peft defaults       # some of them
    python benchmarks/replot.py --out /tmp/results  # somewhere else (the CSV files stay where they are)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent
RESULTS = HERE / "results"
SCRIPTS = {  # result name: the script that writes it
    "adaptation": "adaptation",
    "bench_bluemarble": "bench_bluemarble",
    "by_hand": "by_hand",
    "defaults": "defaults",
    "demo": "demo",
    "distill": "distill",
    "export": "export",
    "forgetting": "forgetting",
    "multilabel": "multilabel",
    "ood": "ood",  # and calibration.*: one script measures both
    "peft": "peft_strategies",
    "regularisers": "regularisers",
    "probe_budget": "probe_budget",
    "scale": "scale",
    "speed": "speed",
}


def replot(name: str, results: Path = RESULTS, out: Path | None = None) -> list[Path]:
    """Call ``benchmarks/<script>.py``'s ``replot`` for the result ``name``; the paths it wrote."""
    script = SCRIPTS[name]
    module = sys.modules.get(f"benchmarks.{script}")
    if module is None:  # by path: the scripts are not a package
        spec = importlib.util.spec_from_file_location(f"benchmarks.{script}", HERE / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    return module.replot(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"results to write again (default: all of {', '.join(SCRIPTS)})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the CSV files are")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: --results)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown result {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    for name in args.names or SCRIPTS:
        for path in replot(name, args.results, args.out):
            print(path)


if __name__ == "__main__":
    main()
