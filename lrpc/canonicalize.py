"""Bring any loaded model to the one form the passes and the emitter expect.

Opset ≥ 18 (reduction axes and Split sizes become inputs, so every rule reads them one way) and
shapes inferred (ranks and symbolic dims let the emitter undo broadcasting statically).
"""

from __future__ import annotations

import onnx
from onnx import shape_inference, version_converter

from lrpc.errors import LrpcError

MIN_OPSET = 18
OLDEST_CONVERTIBLE_OPSET = 7


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise LrpcError("the model imports no default ONNX opset; re-export it with torch.onnx.export")


def canonicalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    if len(proto.graph.output) == 0:
        raise LrpcError("the model has no outputs: there is nothing to explain; re-export it with its outputs")
    opset = default_opset(proto)
    if opset < OLDEST_CONVERTIBLE_OPSET:
        raise LrpcError(f"the model uses opset {opset}; lrpc supports opset {OLDEST_CONVERTIBLE_OPSET} and newer "
                        f"(best ≥ {MIN_OPSET}); re-export it with a newer opset")
    if opset < MIN_OPSET:
        try:
            proto = version_converter.convert_version(proto, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LrpcError(f"could not upgrade the model from opset {opset} to {MIN_OPSET} ({first_line}); "
                            f"re-export it at opset {MIN_OPSET} or newer") from None
    try:
        return shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        _refuse_contradictions(exc)
    try:
        proto = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        pass  # shapes are an aid: the emitter falls back to run-time shape arithmetic without them
    return proto


def _refuse_contradictions(exc: Exception) -> None:
    """A declared shape or type that contradicts what the ops compute would make lrpc explain the wrong
    tensor (e.g. a rank-3 output declared rank 2): refuse. Other inference failures (custom ops, data-
    dependent shapes) are not errors."""
    text = str(exc)
    for marker in ("Inferred shape and existing shape differ", "Inferred elem type differs from existing",
                   "Incompatible dimensions"):
        at = text.find(marker)
        if at >= 0:
            start = text.rfind("(op_type:", 0, at)
            detail = " ".join(text[start if start >= 0 else at:].split())[:240]
            raise LrpcError(f"the model's declared shapes or types contradict its ops ({detail}); "
                            "re-export the model") from None
