"""Run an exported model with ONNX Runtime only: no torch, no Lightning.

>>> from visiontl.deploy.predict import Predictor
>>> predictor = Predictor("model.onnx")  # doctest: +SKIP
>>> for p in predictor.predict(["scan1.png", "scan2.tif"]):  # doctest: +SKIP
...     print(p.path, p.label, p.probability)

Images of any size, grayscale or RGB, 8 or 16 bit are read, converted to the model's channels,
resized as the model's metadata says and batched. Unreadable files are reported and skipped.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from visiontl.data.formats import Frame
from visiontl.data.geometry import eval_resize
from visiontl.data.images import (
    DataError,
    ImageReadError,
    check_frames,
    expand_frames,
    pixel_limit,
    read_image,
    to_channels,
)
from visiontl.data.preprocessing import INTERPOLATIONS, Preprocessing
from visiontl.core.errors import CommandParser, UserError
from visiontl.core.ort import ort_session

__all__ = ["ENGINES", "OpenVINOSession", "Prediction", "Predictor", "PredictorError", "compare_outputs", "main",
           "ort_session", "preprocess"]

ENGINES = ("auto", "onnxruntime", "openvino")


class PredictorError(UserError):
    """A model file the predictor cannot use."""


MAX_CHANNELS = 1024
"""The most input channels a model's metadata may state (multiband and hyperspectral included)."""
DEFAULT_MAX_INPUT_PIXELS = 2 * 89_478_485
"""The input-size bound where Pillow's limit is switched off: Pillow's default, as for images."""
BATCH_BYTES = 1 << 30
"""The most input bytes one batch holds: large inputs run in smaller batches."""
EXPORT_INTERPOLATION = "area (shrink) / bilinear (enlarge)"
"""The ``interpolation`` description ``visiontl export`` writes (the resize is :func:`eval_resize`'s)."""
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def _short(value: Any, limit: int = 80) -> str:
    """A metadata value for a one-line message: text quoted, anything else as JSON; cut."""
    text = " ".join((value if isinstance(value, str) else json.dumps(value, default=str)).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return repr(text) if isinstance(value, str) else text


def _open_model(path: Path, providers: Sequence[str] | None) -> Any:
    """An ONNX Runtime session on ``path``, or a one-line refusal naming it (a folder, a missing or
    unreadable file, a training checkpoint, anything that is not ONNX)."""
    if path.is_dir():
        raise PredictorError(f"Model file {path} is a folder; give the .onnx file `visiontl export` wrote.")
    if not path.is_file():
        raise PredictorError(f"Model file {path} does not exist.")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise PredictorError(f"Cannot read model file {path}: {err.strerror or err}.") from err
    # a zip (torch.save, Lightning) or a pickle (older torch.save) never starts an ONNX protobuf
    checkpoint = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                         b"\x05"))
    if not checkpoint:
        try:
            return ort_session(path, providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : (?:[A-Z_]+ : )?", "", " ".join(str(err).split()))
                reason = reason.replace(f"Load model from {path} failed:", "").strip().rstrip(".")
                detail = "it is empty" if not head else f"{reason[:200]}: damaged, truncated or another kind of file"
                raise PredictorError(f"{path} is not an ONNX model ONNX Runtime can load ({detail}); give the .onnx "
                                     f"file `visiontl export` wrote.") from err
    raise PredictorError(f"{path} is a training checkpoint, not an ONNX model: run `visiontl export {path} --out "
                         f"model.onnx` first, then predict with model.onnx.")


@dataclass
class Prediction:
    """One file's (or one frame's) result (``error`` set and no label when it could not be read).

    A multi-label model (several tags per image) gives ``tags``, the tags whose probability reaches
    their threshold, and ``label`` is them joined by ``|`` (empty: no tag); ``probability`` is None
    and ``probabilities`` holds each tag's.

    A model exported with an out-of-distribution detector (:mod:`visiontl.analyse.ood`) gives
    ``ood_score`` (higher: less like the training images) and ``abstain``: the score is over the
    threshold set on the validation images (None when the model has no detector, or abstention
    was turned off). The label is still given: what to do with a flagged image is the caller's call."""

    path: str
    frame: int | None = None  # the frame of a multi-frame DICOM, under frames="all"
    label: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    tags: list[str] | None = None
    ood_score: float | None = None
    abstain: bool | None = None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, atol: float = 1e-4, rtol: float = 1e-3,
                    prob_atol: float = 1e-4, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Compare ONNX Runtime logits (``candidate``) with PyTorch's (``reference``), N x K each.

    ``thresholds`` (one per tag) compares a multi-label model's outputs: probabilities by the
    sigmoid, and decisions (tag or not) instead of the top-1 class; "top-1" in the result's names
    then means those per-(image, tag) decisions.

    Returns:
        ``passed`` and the numbers behind it: ``max_abs_logit_diff`` against
        ``logit_tolerance`` (``atol + rtol * logit_scale``, ``logit_scale`` = max |reference|),
        ``max_prob_diff`` against ``prob_atol``, ``top1_agreement`` and ``top1_mismatches``
        (images whose top-1 differs although PyTorch's margin between its two best classes
        exceeds the logit tolerance; multi-label: decisions that differ although PyTorch's logit is
        farther than the tolerance from the threshold's).
    """
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    diff = float(np.abs(candidate - reference).max()) if reference.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    tolerance = atol + rtol * scale
    if thresholds is not None:
        cut = _logit(np.asarray(thresholds))[None, :]
        prob_diff = float(np.abs(_sigmoid(candidate) - _sigmoid(reference)).max()) if reference.size else 0.0
        same = (candidate >= cut) == (reference >= cut)
        mismatches = int((~same & (np.abs(reference - cut) > tolerance)).sum())
    else:
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
        abstain: flag predictions whose out-of-distribution score is over the model's threshold
            (``Prediction.abstain``); False leaves the flag out and keeps the score.
    """

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 max_pixels: int | None = None, frames: str = "error", engine: str = "onnxruntime",
                 abstain: bool = True) -> None:
        if engine not in ENGINES:
            raise PredictorError(f"Unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        self.engine = engine
        self.max_pixels = max_pixels
        self.abstain = bool(abstain)
        try:
            self.frames = check_frames(frames)
        except DataError as err:
            raise PredictorError(str(err)) from err
        path = Path(model_path)
        self.path = path
        self.session = _open_model(path, providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("class_names", "input_size", "channels") if k not in meta]
        if missing:
            raise PredictorError(
                f"{path} has no visiontl metadata ({', '.join(missing)} missing); export it with `visiontl export`."
            )
        self.metadata = dict(meta)
        self._read_metadata(path, meta)
        self._check_graph(path)
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

    def _read_metadata(self, path: Path, meta: Any) -> None:
        """Parse and bound the metadata: it is the model file's, someone else's data. Nothing is
        allocated from it before it passed (``input_size [100000, 100000]`` is refused here)."""
        def refuse(problem: str) -> NoReturn:
            raise PredictorError(f"{path} has invalid visiontl metadata: {problem}. Re-export it with `visiontl "
                                 f"export` (was the file edited or damaged?).")

        try:
            names, size = json.loads(meta["class_names"]), json.loads(meta["input_size"])
            preprocessing = json.loads(meta["preprocessing"]) if "preprocessing" in meta else None
        except ValueError as err:
            raise PredictorError(f"{path} has unreadable visiontl metadata ({err}); re-export it with "
                                 f"`visiontl export`.") from err
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in names)):
            refuse(f"class_names {_short(meta['class_names'])} must be a non-empty JSON list of names")
        self.class_names: list[str] = [str(n) for n in names]
        self.thresholds: list[float] | None = None  # multi-label: one per tag
        if meta.get("task", "multiclass") == "multilabel":
            try:
                thresholds = json.loads(meta.get("thresholds", "null"))
            except ValueError:
                thresholds = None
            if (not isinstance(thresholds, list) or len(thresholds) != len(names)
                    or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in thresholds)):
                refuse(f"thresholds {_short(meta.get('thresholds'))} must be one number between 0 and 1 per tag")
            self.thresholds = [float(t) for t in thresholds]
        elif meta.get("task", "multiclass") != "multiclass":
            refuse(f"task {_short(meta.get('task'))} must be multiclass or multilabel")
        twice = sorted(n for n, count in Counter(self.class_names).items() if count > 1)
        if twice:
            refuse(f"class_names lists {_short(twice)} more than once")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            refuse(f"input_size {_short(meta['input_size'])} must be [height, width], two whole numbers >= 1")
        self.size = (size[0], size[1])
        self.ood: dict[str, Any] | None = None  # the detector's settings: its score and threshold
        if "ood" in meta:
            try:
                ood = json.loads(meta["ood"])
            except ValueError:
                ood = None
            threshold = ood.get("threshold") if isinstance(ood, dict) else None
            if (not isinstance(ood, dict) or not isinstance(ood.get("score"), str) or (threshold is not None and (
                    not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold)))):
                refuse(f"ood {_short(meta['ood'])} must be a JSON object with a score name and a finite threshold")
            self.ood = ood
        channels = str(meta["channels"]).strip()
        if not channels.isdigit() or not 1 <= int(channels) <= MAX_CHANNELS:
            refuse(f"channels {_short(meta['channels'])} must be a whole number from 1 to {MAX_CHANNELS}")
        self.channels = int(channels)
        try:  # models exported before crop_pct was recorded: none
            self.crop_pct = float(meta.get("crop_pct", 1.0))
        except ValueError:
            self.crop_pct = float("nan")
        if not 0 < self.crop_pct <= 1:
            refuse(f"crop_pct {_short(meta.get('crop_pct'))} must be a number in (0, 1]")
        try:
            limit = pixel_limit(self.max_pixels) or DEFAULT_MAX_INPUT_PIXELS
        except DataError as err:
            raise PredictorError(str(err)) from err
        height, width = self.size
        if height * width > limit:
            refuse(f"input_size {list(self.size)} is {height * width / 1e6:,.0f} Mpx per image, above the "
                   f"{limit / 1e6:,.0f} Mpx pixel limit (--max-pixels / VISIONTL_MAX_PIXELS raise it for a model "
                   f"that really takes such inputs)")
        interpolation = meta.get("interpolation")  # a description for people; the resize is eval_resize's
        if interpolation is not None and interpolation not in (*INTERPOLATIONS, EXPORT_INTERPOLATION):
            refuse(f"interpolation {_short(interpolation)} is none of {', '.join(INTERPOLATIONS)} "
                   f"(or {EXPORT_INTERPOLATION!r})")
        self.preprocessing: Preprocessing | None = None  # the training-time object (exports since 0.1)
        if preprocessing is not None:
            if not isinstance(preprocessing, dict):
                refuse(f"preprocessing {_short(meta['preprocessing'])} must be a JSON object")
            try:
                self.preprocessing = Preprocessing.from_dict(preprocessing)
            except (TypeError, ValueError, OverflowError) as err:
                refuse(f"preprocessing {str(err).removeprefix('Invalid preprocessing: ').rstrip('.')}")
        pre = self.preprocessing
        if pre is not None and (pre.in_chans != self.channels or (pre.size, pre.size) != tuple(self.size)
                                or abs(pre.crop_pct - self.crop_pct) > 1e-9):
            refuse(f"its preprocessing record (in_chans {pre.in_chans}, size {pre.size}, crop_pct {pre.crop_pct}) "
                   f"disagrees with channels {self.channels}, input_size {list(self.size)}, crop_pct {self.crop_pct}")

    def _check_graph(self, path: Path) -> None:
        """The metadata must describe the graph: its input (float NCHW, the channels and, where the
        graph fixes them, the height and width) and its scores (one per class name)."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        problems = []
        graph_in = inputs.get("input")
        graph_out = outputs.get("probabilities")
        if graph_in is None or len(graph_in.shape) != 4 or graph_out is None:
            problems.append(f"graph inputs {sorted(inputs)} / outputs {sorted(outputs)} (expected 'input' NCHW and "
                            f"'probabilities')")
        else:
            _, chans, height, width = graph_in.shape
            if graph_in.type != "tensor(float)":
                problems.append(f"the graph's input is {graph_in.type}, not float32")
            if isinstance(chans, int) and chans != self.channels:
                problems.append(f"the graph takes {chans} channels, the metadata says {self.channels}")
            fixed = [(v, want) for v, want in zip((height, width), self.size) if isinstance(v, int)]
            if any(v != want for v, want in fixed):
                problems.append(f"the graph takes {height} x {width} inputs, the metadata's input_size is "
                                f"{list(self.size)}")
            scores = graph_out.shape
            if len(scores) != 2:
                problems.append(f"its 'probabilities' output has shape {scores}, not (batch, classes)")
            elif isinstance(scores[1], int) and scores[1] != len(self.class_names):
                problems.append(f"the graph outputs {scores[1]} class scores, the metadata names "
                                f"{len(self.class_names)} classes ({_short(self.class_names)})")
            if (self.ood is not None) != ("ood_score" in outputs):
                problems.append("its metadata and graph disagree on an out-of-distribution score (metadata 'ood' "
                                f"{'present' if self.ood is not None else 'absent'}, output 'ood_score' "
                                f"{'present' if 'ood_score' in outputs else 'absent'})")
        if problems:
            raise PredictorError(f"{path} does not match its visiontl metadata: {'; '.join(problems)}. Re-export "
                                 f"it with `visiontl export`.")

    def _check_engine(self, path: Path) -> dict[str, Any]:
        """The engine must reproduce ONNX Runtime on fixed inputs (8 seeded images in [0, 1]): within
        the export's tolerance for a float model; an int8 model (other int8 kernels round otherwise)
        within 10 % of the logit scale, with no top-1 change where ORT's margin exceeds that."""
        height, width = self.size
        probe = np.random.default_rng(0).random((8, self.channels, height, width), dtype=np.float32)
        reference = self.session.run(["logits"], {"input": probe})[0]
        candidate = self.runner.run(["logits"], {"input": probe})[0]
        int8 = "quantization" in self.metadata
        check = compare_outputs(reference, candidate, rtol=0.1 if int8 else 1e-3, prob_atol=1.0 if int8 else 1e-4,
                                thresholds=self.thresholds)
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
        height, width = self.size  # bounded by the pixel limit; a batch of large inputs is smaller
        batch_size = max(1, min(batch_size, BATCH_BYTES // (4 * self.channels * height * width)))
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
        names = ["probabilities", *(["ood_score"] if self.ood is not None else [])]
        try:
            out = self.runner.run(names, {"input": np.stack(batch)})
            probs = out[0]
        except Exception as err:  # noqa: BLE001 - the runtime's own exception types; the model is the input
            raise PredictorError(f"{self.engine} cannot run {self.path} on a batch of shape "
                                 f"{[len(batch), *batch[0].shape]}: {' '.join(str(err).split())[:300]}. Re-export it "
                                 f"with `visiontl export`.") from err
        if probs.ndim != 2 or probs.shape != (len(pending), len(self.class_names)):
            raise PredictorError(f"{self.path} outputs scores of shape {list(probs.shape)} for {len(pending)} images, "
                                 f"its metadata names {len(self.class_names)} classes "
                                 f"({_short(self.class_names)}); re-export it with `visiontl export`.")
        scores = out[1].reshape(-1) if self.ood is not None else None
        if scores is not None and len(scores) != len(pending):
            raise PredictorError(f"{self.path} outputs {len(scores)} out-of-distribution scores for {len(pending)} "
                                 f"images; re-export it with `visiontl export`.")
        threshold = self.ood.get("threshold") if self.ood is not None and self.abstain else None
        for i, (pred, row) in enumerate(zip(pending, probs)):
            if scores is not None:
                pred.ood_score = float(scores[i])
                pred.abstain = None if threshold is None else bool(scores[i] > threshold)
            pred.probabilities = {n: float(v) for n, v in zip(self.class_names, row)}
            if self.thresholds is not None:  # multi-label: every tag at or over its threshold
                pred.tags = [n for n, v, t in zip(self.class_names, row, self.thresholds) if v >= t]
                pred.label = "|".join(pred.tags)
                continue
            best = int(row.argmax())
            pred.label, pred.probability = self.class_names[best], float(row[best])


def main(argv: Sequence[str] | None = None) -> int:
    """``visiontl predict-onnx model.onnx IMAGES... [--out preds.csv]``; exit 1 if any file failed."""
    parser = CommandParser(prog="visiontl predict-onnx",
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
    parser.add_argument("--no-abstain", action="store_true",
                        help="leave out the abstain column (a model with an out-of-distribution detector still "
                             "gives its ood_score)")
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
    predictor = Predictor(args.model, max_pixels=args.max_pixels, frames=args.frames, engine=args.engine,
                          abstain=not args.no_abstain)
    results = predictor.predict(files, batch_size=args.batch_size)
    from visiontl.core.files import csv_writer

    buf = io.StringIO()
    writer = csv_writer(buf)  # names and paths that a spreadsheet would run as formulas are escaped
    framed = args.frames == "all"
    ood = ["ood_score", *(["abstain"] if predictor.abstain else [])] if predictor.ood is not None else []

    def unfamiliar(r: Prediction) -> list[str]:
        """The out-of-distribution columns of a row (empty for a file that could not be read)."""
        if not ood:
            return []
        score = "" if r.ood_score is None else f"{r.ood_score:.6f}"
        return [score, *([] if len(ood) == 1 else ["" if r.abstain is None else str(r.abstain).lower()])]

    if predictor.thresholds is not None:  # multi-label: the tags over threshold, and every tag's probability
        names = predictor.class_names
        writer.writerow(["path", *(["frame"] if framed else []), "tags", *(f"p_{n}" for n in names), *ood, "error"])
        for r in results:
            frame = ["" if r.frame is None else r.frame] if framed else []
            scores = [f"{r.probabilities[n]:.6f}" if r.probabilities else "" for n in names]
            writer.writerow([r.path, *frame, r.label or "", *scores, *unfamiliar(r), r.error or ""])
    else:
        writer.writerow(["path", *(["frame"] if framed else []), "label", "probability", *ood, "error"])
    for r in results if predictor.thresholds is None else []:
        probability = f"{r.probability:.6f}" if r.probability is not None else ""
        frame = ["" if r.frame is None else r.frame] if framed else []
        writer.writerow([r.path, *frame, r.label or "", probability, *unfamiliar(r), r.error or ""])
    if args.out:
        from visiontl.core.files import write_text

        write_text(args.out, buf.getvalue())  # a full or read-only destination: one line, the old file kept
    else:
        print(buf.getvalue(), end="")
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"skipped {r.path}{'' if r.frame is None else f' frame {r.frame}'}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
