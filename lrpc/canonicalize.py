"""Bring any loaded model to the one form the passes and the emitter expect.

Opset ≥ 18 (reduction axes and Split sizes become inputs, so every rule reads them one way) and
shapes inferred (ranks and symbolic dims let the emitter undo broadcasting statically).
"""

from __future__ import annotations

import logging

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
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        _refuse_contradictions(exc)
        try:
            proto = shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:
            pass  # shapes are an aid: the emitter falls back to run-time shape arithmetic without them
    return _symbolic_shapes(proto)


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in the dims ONNX inference leaves unknown with onnxruntime's symbolic shape inference, which
    follows shapes computed at run time (Shape → Gather → Concat → Reshape, as TorchScript exports build
    every attention reshape): with `batch`/`sequence` known everywhere, the emitter proves broadcasting
    static instead of emitting run-time shape arithmetic. Any failure keeps ONNX's shapes."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return proto
    if _guessed_shapes(proto):
        return proto
    try:
        inferred = _run_symbolic(SymbolicShapeInference, _without_weights(proto))
    except Exception:  # noqa: BLE001 (an unsupported op, a shape it cannot follow, another onnxruntime)
        return proto
    better = {v.name: v for v in inferred.graph.value_info}
    known = {v.name: i for i, v in enumerate(proto.graph.value_info)}
    for name, info in better.items():
        if name in known:
            old = proto.graph.value_info[known[name]]
            if _unknown_dims(info) < _unknown_dims(old):
                old.CopyFrom(info)
        else:
            proto.graph.value_info.append(info)
    return proto


def _guessed_shapes(proto: onnx.ModelProto) -> bool:
    """Symbolic inference guesses where a shape operand comes at run time — an equal split for a Split's
    sizes, no reduction at all for a Reduce*'s axes — and annotates shapes that onnxruntime then enforces
    (and fails on), so ONNX's own shapes must do."""
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return any((n.op_type == "Split" or n.op_type.startswith("Reduce")) and len(n.input) > 1 and n.input[1]
               and n.input[1] not in constants for n in proto.graph.node)


def _run_symbolic(inference, model: onnx.ModelProto) -> onnx.ModelProto:
    """SymbolicShapeInference.infer_shapes without its failure path, which writes sym_shape_infer_temp.onnx
    into the current directory and discards what it did infer: the same steps, keeping partial results."""
    log = logging.getLogger(inference.__module__)
    level, log.level = log.level, logging.ERROR  # its warnings are about shapes it leaves unknown: ours to handle
    try:
        run = inference(2**31 - 1, True, False, 0)   # int_max, auto_merge, guess_output_rank, verbose
        run._preprocess(model)
        while run.run_:
            run._infer_impl()
        run._update_output_from_vi()
        return run.out_mp_
    finally:
        log.level = level


def _unknown_dims(info: onnx.ValueInfoProto) -> float:
    """How little a value_info says about its tensor's shape (no shape at all: infinitely little)."""
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return float("inf")
    return sum(1 for d in tensor.shape.dim if not d.HasField("dim_value") and
               (not d.HasField("dim_param") or d.dim_param.startswith("unk__")))


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers' data left out (their names, dims and types kept): shape
    inference reads only small shape constants, and a full copy would double the memory for the weights."""
    light = onnx.ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    graph, source = light.graph, proto.graph
    graph.name = source.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(source, field))
    for tensor in source.initializer:
        graph.initializer.append(tensor if tensor.ByteSize() <= 4096 else
                                 onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims))
    return light


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
