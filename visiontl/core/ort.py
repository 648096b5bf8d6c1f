"""ONNX Runtime sessions, set up the one way visiontl runs every ONNX model (features, export checks,
int8 calibration, prediction). Imports neither torch nor Lightning."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from visiontl.core.machine import cpu_count

__all__ = ["ort_session"]


def ort_session(model: str | os.PathLike[str] | bytes, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session using every CPU this process may run on.

    ORT's default thread count can leave cores idle; the threads are set explicitly (the latency
    it saved on the project's machine is in docs/how-to/export-deploy.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    # WeightBiasQuantization (ONNX Runtime >= 1.20) re-quantises, per tensor, the float weights of a
    # node that an int8 model deliberately kept float: on a depthwise convolution that undid the
    # exclusion and took agreement from 0.97 to 0.58 (visiontl.deploy.quantize); unknown names are ignored.
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
