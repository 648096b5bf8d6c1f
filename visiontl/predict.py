"""Run an exported model with ONNX Runtime only: no torch, no Lightning.

>>> from visiontl.predict import Predictor
>>> predictor = Predictor("model.onnx")  # doctest: +SKIP
>>> for p in predictor.predict(["scan1.png", "scan2.tif"]):  # doctest: +SKIP
...     print(p.path, p.label, p.probability)

Images of any size, grayscale or RGB, 8 or 16 bit are read, converted to the model's channels,
resized as the model's metadata says and batched. Unreadable files are reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.data.geometry import eval_resize
from visiontl.data.formats import Frame
from visiontl.data.preprocessing import Preprocessing
from visiontl.data.images import DataError, ImageReadError, check_frames, expand_frames, read_image, to_channels

__all__ = ["ENGINES", "OpenVINOSession", "Prediction", "Predictor", "PredictorError", "compare_outputs", "main",
           "ort_session", "preprocess"]

ENGINES = ("auto", "onnxruntime", "openvino")


class PredictorError(ValueError):
    """A model file the predictor cannot use."""


@dataclass
class Prediction:
    """One file's (or one frame's) result (``error`` set and no label when it could not be read)."""

    path: str
    frame: int | None = None  # the frame of a multi-frame DICOM, under frames="all"
    label: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, atol: float = 1e-4, rtol: float = 1e-3,
                    prob_atol: float = 1e-4) -> dict[str, Any]:
    """Compare ONNX Runtime logits (``candidate``) with PyTorch's (``reference``), N x K each.

    Returns:
        ``passed`` and the numbers behind it: ``max_abs_logit_diff`` against
        ``logit_tolerance`` (``atol + rtol * logit_scale``, ``logit_scale`` = max |reference|),
        ``max_prob_diff`` against ``prob_atol``, ``top1_agreement`` and ``top1_mismatches``
        (images whose top-1 differs although PyTorch's margin between its two best classes
        exceeds the logit tolerance).
    """
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    diff = float(np.abs(candidate - reference).max()) if reference.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    tolerance = atol + rtol * scale
    prob_diff = float(np.abs(_softmax(candidate) - _softmax(reference)).max()) if reference.size else 0.0
    same = candidate.argmax(1) == reference.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    clear = (top2[:, 1] - top2[:, 0]) > tolerance
    mismatches = int((~same & clear).sum())
    return {
        "passed": bool(diff <= tolerance and prob_diff <= prob_atol and mismatches == 0),
        "max_abs_logit_diff": diff, "logit_scale": scale, "logit_tolerance": tolerance, "atol": atol, "rtol": rtol,
        "max_prob_diff": prob_diff, "prob_atol": prob_atol,
        "top1_agreement": float(same.mean()) if len(same) else 1.0, "top1_mismatches": mismatches,
    }


def ort_session(model: str | os.PathLike[str] | bytes, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session using every CPU this process may run on.

    ORT's default thread count can leave cores idle; the threads are set explicitly (the latency
    it saved on the project's machine is in docs/how-to/export-deploy.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    options.intra_op_num_threads = cpus
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    # WeightBiasQuantization (ONNX Runtime >= 1.20) re-quantises, per tensor, the float weights of a
    # node that an int8 model deliberately kept float: on a depthwise convolution that undid the
    # exclusion and took agreement from 0.97 to 0.58 (visiontl.quantize); unknown names are ignored.
    # From ONNX Runtime 1.32 the QDQ node-group fusion also takes such a node (DQ -> Conv with float
    # weights -> Q) and computes it wrongly (logits 13 off on a scale of 20, varying from run to run):
    # int8 models with a kept-float node run without that fusion (correct, slower); others keep it
    disabled = ["WeightBiasQuantization"]
    if _has_kept_float_node(source):
        disabled.append("QDQSelectorActionTransformer")
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=disabled)


def _has_kept_float_node(source: str | bytes) -> bool:
    """Whether a QDQ (int8) model has a Conv / Gemm / MatMul whose weight is a float initializer:
    a node the quantiser kept float on purpose, between quantised neighbours."""
    import onnx

    try:
        graph = (onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)).graph
    except Exception:  # noqa: BLE001 - not readable as ONNX here: ONNX Runtime will say why
        return False
    if not any(n.op_type == "DequantizeLinear" for n in graph.node):
        return False
    floats = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return any(n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in floats
               for n in graph.node)


class OpenVINOSession:
    """The same ONNX file compiled by OpenVINO for the CPU, with ONNX Runtime's ``run(names, feeds)``.

    OpenVINO (PyPI ``openvino``, the ``openvino`` extra) is Intel's CPU inference runtime; it reads
    the exported ONNX file itself, so there is still one artefact.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise PredictorError("engine 'openvino' needs the openvino package: pip install 'visiontl[openvino]' "
                                 "(or use the default engine, onnxruntime).") from err
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # float32 arithmetic: on CPUs with bfloat16 units OpenVINO's default precision is bf16 (logits
        # 2e-2 off on Lite0, where the export verifies to 1e-3)
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", {"INFERENCE_NUM_THREADS": cpus,
                                                                          "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.asarray(result[self.compiled.output(name)]) for name in names]


def preprocess(path: str | os.PathLike[str], size: tuple[int, int], channels: int, crop_pct: float = 1.0,
               max_pixels: int | None = None, frame: Frame = "error") -> np.ndarray:
    """Read an image and bring it to the export convention: float32 CHW in [0, 1] at ``size``.

    The geometry is :func:`visiontl.data.geometry.eval_resize`, the one training evaluated with:
    images at least as large as the input are resized to ``size / crop_pct`` and centre-cropped,
    smaller ones are upsampled and never cropped. ``frame``: a multi-frame DICOM's frame (an index
    or ``"middle"``; ``"error"`` refuses such a file).
    """
    image = to_channels(read_image(path, max_pixels, frame), channels, path)
    resized = eval_resize(image, size, crop_pct)
    height, width = size
    return np.ascontiguousarray(resized.reshape(height, width, channels).transpose(2, 0, 1), dtype=np.float32)


class Predictor:
    """An exported visiontl model in ONNX Runtime.

    Args:
        model_path: an ``.onnx`` file written by ``visiontl export``.
        providers: ONNX Runtime execution providers (default: CPU).
        max_pixels: larger images are reported as errors, not decoded (see
            :func:`visiontl.data.images.pixel_limit`).
        frames: multi-frame DICOMs: ``error`` reports them, ``middle`` predicts their middle
            frame, ``all`` every frame (one :class:`Prediction` each, ``frame`` set).
    """

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 max_pixels: int | None = None, frames: str = "error", engine: str = "onnxruntime") -> None:
        if engine not in ENGINES:
            raise PredictorError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        self.engine = engine
        self.max_pixels = max_pixels
        try:
            self.frames = check_frames(frames)
        except DataError as err:
            raise PredictorError(str(err)) from err
        path = Path(model_path)
        if not path.is_file():
            raise PredictorError(f"Model file {path} does not exist.")
        try:
            self.session = ort_session(path, providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PredictorError(f"{path} is not a model ONNX Runtime can load: {err}") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("class_names", "input_size", "channels") if k not in meta]
        if missing:
            raise PredictorError(
                f"{path} has no visiontl metadata ({', '.join(missing)} missing); export it with `visiontl export`."
            )
        self.metadata = dict(meta)
        try:
            self.class_names: list[str] = [str(n) for n in json.loads(meta["class_names"])]
            self.size = tuple(int(v) for v in json.loads(meta["input_size"]))
            self.channels = int(meta["channels"])
            self.crop_pct = float(meta.get("crop_pct", 1.0))  # models exported before crop_pct was recorded: none
            self.preprocessing: Preprocessing | None = (  # the training-time object (exports since 0.1)
                Preprocessing.from_dict(json.loads(meta["preprocessing"])) if "preprocessing" in meta else None)
        except (TypeError, ValueError) as err:
            raise PredictorError(f"{path} has unreadable visiontl metadata ({err}); re-export it with "
                                 f"`visiontl export`.") from err
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        problems = []
        if len(self.size) != 2 or min(self.size) < 1 or self.channels < 1 or not 0 < self.crop_pct <= 1:
            problems.append(f"input_size {list(self.size)}, channels {self.channels}, crop_pct {self.crop_pct}")
        if not self.class_names:
            problems.append("no class names")
        pre = self.preprocessing
        if pre is not None and (pre.in_chans != self.channels or (pre.size, pre.size) != tuple(self.size)
                                or abs(pre.crop_pct - self.crop_pct) > 1e-9):
            problems.append(f"its preprocessing record {pre.to_dict()} disagrees with input_size / channels / crop_pct")
        if "input" not in inputs or len(inputs["input"]) != 4 or "probabilities" not in outputs:
            problems.append(f"graph inputs {sorted(inputs)} / outputs {sorted(outputs)} (expected 'input' NCHW and "
                            f"'probabilities')")
        elif isinstance(inputs["input"][1], int) and inputs["input"][1] != self.channels:
            problems.append(f"the graph takes {inputs['input'][1]} channels, the metadata says {self.channels}")
        if problems:
            raise PredictorError(f"{path} does not match its visiontl metadata: {'; '.join(problems)}. Re-export "
                                 f"it with `visiontl export`.")
        self.runner: Any = self.session
        self.engine_check: dict[str, Any] | None = None
        if engine == "auto":  # OpenVINO where it was measured faster (int8: docs/how-to/export-deploy.md), when installed
            self.engine = "onnxruntime"
            if "quantization" in self.metadata and importlib.util.find_spec("openvino") is not None:
                try:
                    self.runner, self.engine_check, self.engine = OpenVINOSession(path), None, "openvino"
                    self.engine_check = self._check_engine(path)
                except PredictorError:
                    self.runner, self.engine = self.session, "onnxruntime"  # it did not agree: stay on ORT
        elif engine == "openvino":
            self.runner = OpenVINOSession(path)
            self.engine_check = self._check_engine(path)

    def _check_engine(self, path: Path) -> dict[str, Any]:
        """The engine must reproduce ONNX Runtime on fixed inputs (8 seeded images in [0, 1]): within
        the export's tolerance for a float model; an int8 model (other int8 kernels round otherwise)
        within 10 % of the logit scale, with no top-1 change where ORT's margin exceeds that."""
        height, width = self.size
        probe = np.random.default_rng(0).random((8, self.channels, height, width), dtype=np.float32)
        reference = self.session.run(["logits"], {"input": probe})[0]
        candidate = self.runner.run(["logits"], {"input": probe})[0]
        int8 = "quantization" in self.metadata
        check = compare_outputs(reference, candidate, rtol=0.1 if int8 else 1e-3, prob_atol=1.0 if int8 else 1e-4)
        if not check["passed"]:
            raise PredictorError(
                f"openvino does not reproduce ONNX Runtime on {path}: max logit difference "
                f"{check['max_abs_logit_diff']:.2e} (allowed {check['logit_tolerance']:.2e}), max probability "
                f"difference {check['max_prob_diff']:.2e}; use engine 'onnxruntime'.")
        return check

    def predict(self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 32) -> list[Prediction]:
        """Predict every path in order (every frame of a multi-frame DICOM under ``frames="all"``);
        unreadable files come back with ``error`` set."""
        results: list[Prediction] = []  # in input order; filled in place batch by batch
        batch: list[np.ndarray] = []
        pending: list[Prediction] = []
        for path, name, frame in expand_frames([(Path(p), str(p)) for p in paths], self.frames):
            result = Prediction(name, frame=frame if isinstance(frame, int) else None)
            results.append(result)
            try:
                batch.append(preprocess(path, self.size, self.channels, self.crop_pct, self.max_pixels, frame))
            except ImageReadError as err:
                result.error = err.reason
                continue
            pending.append(result)
            if len(batch) == batch_size:
                self._run(batch, pending)
                batch, pending = [], []
        if batch:
            self._run(batch, pending)
        return results

    def _run(self, batch: list[np.ndarray], pending: list[Prediction]) -> None:
        probs = self.runner.run(["probabilities"], {"input": np.stack(batch)})[0]
        for pred, row in zip(pending, probs):
            best = int(row.argmax())
            pred.label, pred.probability = self.class_names[best], float(row[best])
            pred.probabilities = {n: float(v) for n, v in zip(self.class_names, row)}


def main(argv: Sequence[str] | None = None) -> int:
    """``visiontl predict-onnx model.onnx IMAGES... [--out preds.csv]``; exit 1 if any file failed."""
    parser = argparse.ArgumentParser(prog="visiontl predict-onnx",
                                     description="Predict images with an exported model (ONNX Runtime only).")
    parser.add_argument("model", help="an .onnx file written by `visiontl export`")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", help="write a CSV here instead of printing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engine", choices=ENGINES, default="onnxruntime",
                        help="the runtime (auto: OpenVINO for int8 models when installed, else ONNX Runtime; "
                             "OpenVINO is checked against ONNX Runtime on load)")
    parser.add_argument("--max-pixels", type=int, help="report larger images as errors (default: Pillow's limit)")
    parser.add_argument("--frames", choices=("error", "middle", "all"), default="error",
                        help="multi-frame DICOMs: report them (error), predict the middle frame, or every frame "
                             "(all: one row each, with a frame column)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {args.batch_size}.", file=sys.stderr)
        return 2
    from visiontl.data.layout import list_images

    files: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            try:
                files.extend(list_images(item))
            except DataError:
                pass  # a folder without images: reported below if nothing is left
        else:
            files.append(item)  # a missing file is reported with the others
    if not files:
        print(f"error: no image files in {', '.join(args.images)} (searched recursively; extensions: "
              f"png, jpg, tif, dcm...).", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.model, max_pixels=args.max_pixels, frames=args.frames, engine=args.engine)
    except PredictorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = predictor.predict(files, batch_size=args.batch_size)
    buf = io.StringIO()
    writer = csv.writer(buf)
    framed = args.frames == "all"
    writer.writerow(["path", *(["frame"] if framed else []), "label", "probability", "error"])
    for r in results:
        probability = f"{r.probability:.6f}" if r.probability is not None else ""
        frame = ["" if r.frame is None else r.frame] if framed else []
        writer.writerow([r.path, *frame, r.label or "", probability, r.error or ""])
    if args.out:
        from visiontl._io import write_text

        try:
            write_text(args.out, buf.getvalue())
        except OSError as err:
            print(f"error: cannot write {args.out}: {err.strerror or err}; choose another --out.", file=sys.stderr)
            return 2
    else:
        print(buf.getvalue(), end="")
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"skipped {r.path}{'' if r.frame is None else f' frame {r.frame}'}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
