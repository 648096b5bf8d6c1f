"""int8 ONNX models through ``onnxruntime.quantization``, accepted only if they agree with float.

CNNs get static QDQ quantisation calibrated on real training images (the fast path). Transformers
get dynamic quantisation of MatMul only. Convolutions are never quantised dynamically: ONNX
Runtime's ConvInteger kernels are far slower than float (README, ``benchmarks/results/export.md``).
The int8 model is checked on real validation images; below ``min_agreement`` top-1 agreement
with the float model it is refused and the float model stays the artefact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuantizeError", "quantize_int8"]


class QuantizeError(ValueError):
    """Quantisation that cannot run (no calibration images, unsupported model)."""


def _is_cnn(model_path: Path) -> bool:
    """Convolutions beyond a patch-embedding stem (a ViT has one Conv; a CNN has dozens)."""
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load(str(model_path)).graph.node) > 2


def _latency(session: Any, batch: np.ndarray, repeats: int = 5) -> float:
    session.run(["logits"], {"input": batch})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(["logits"], {"input": batch})
    return (time.perf_counter() - start) / repeats


def quantize_int8(
    float_model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: np.ndarray | None,
    validation: np.ndarray,
    min_agreement: float = 0.99,
) -> dict[str, Any]:
    """Quantise ``float_model`` and keep the result at ``out`` only if it agrees enough.

    Args:
        float_model: a verified float32 export (input ``input``, outputs ``logits``, ...).
        out: where the int8 model goes when accepted.
        calibration: preprocessed training images (N, C, H, W) for static quantisation of CNNs.
        validation: preprocessed validation images for the agreement check.
        min_agreement: minimum top-1 agreement with the float model.

    Returns:
        Report: method, accepted, top-1 agreement, sizes, batch-1 latencies (float vs int8).
    """
    float_model, out = Path(float_model), Path(out)
    try:
        return _quantize(float_model, out, calibration, validation, min_agreement)
    except _Refused as refused:
        return refused.report


def _quantize(float_model: Path, out: Path, calibration: np.ndarray | None, validation: np.ndarray,
              min_agreement: float) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quant_pre_process, quantize_dynamic, quantize_static

    from visiontl._io import atomic_path
    from visiontl.predict import ort_session

    cnn = _is_cnn(float_model)
    with atomic_path(out) as tmp:
        if cnn:
            if calibration is None or len(calibration) == 0:
                raise QuantizeError(
                    "Static int8 quantisation of a CNN needs calibration images (--images or the run's own)."
                )

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter([{"input": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.batches, None)

            with tempfile.TemporaryDirectory() as work:
                prepared = Path(work) / "prepared.onnx"  # shape inference + graph clean-up first
                quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
            method = f"static QDQ, calibrated on {len(calibration)} images"
        else:
            quantize_dynamic(str(float_model), str(tmp), op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8)
            method = "dynamic, MatMul only"
        fp = ort_session(float_model)
        q8 = ort_session(tmp)
        agree = float((fp.run(["logits"], {"input": validation})[0].argmax(1)
                       == q8.run(["logits"], {"input": validation})[0].argmax(1)).mean())
        report = {
            "method": method, "top1_agreement": agree, "validated_on": len(validation),
            "min_agreement": min_agreement, "accepted": agree >= min_agreement,
            "float_bytes": float_model.stat().st_size, "int8_bytes": tmp.stat().st_size,
            "float_latency_ms_bs1": 1000 * _latency(fp, validation[:1]),
            "int8_latency_ms_bs1": 1000 * _latency(q8, validation[:1]),
        }
        if not report["accepted"]:
            # raising inside atomic_path removes the temporary file; nothing lands at ``out``
            raise _Refused(report)
        proto = onnx.load(str(tmp))
        meta = {p.key: p.value for p in onnx.load(str(float_model)).metadata_props}
        meta["quantization"] = json.dumps(report)
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
    return report


class _Refused(Exception):
    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("int8 refused")
        self.report = report

