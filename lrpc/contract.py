"""The explainer's input/output contract (docs/design.md, "Explainer contract").

Added inputs: `lrp_target` int64 [batch] (or `lrp_seed` float [batch, classes] with a vector seed)
and, for rank-3 explained outputs, `lrp_position` int64 [batch]. Added outputs: one
`relevance.<name>` per attributed input (and per latent tensor). Everything else is untouched.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from lrpc.analysis import Attribution
from lrpc.errors import LrpcError
from lrpc.graph import Builder, checked

TARGET, POSITION, SEED = "lrp_target", "lrp_position", "lrp_seed"
K_DIM = "lrp_targets"   # the symbolic K of an explainer compiled with --targets dynamic
RELEVANCE_PREFIX = "relevance."
METADATA_KEY = "lrpc.explainer"
F32, I64 = ir.DataType.FLOAT, ir.DataType.INT64


def explained_output(graph: ir.Graph, name: str | None) -> ir.Value:
    outputs = {v.name: v for v in graph.outputs}
    if name is None:
        value = graph.outputs[0]
    elif name not in outputs:
        raise LrpcError(f"--output {name}: the model has no output of that name; its outputs are "
                        f"{', '.join(outputs)}")
    else:
        value = outputs[name]
    r = value.shape.rank() if value.shape is not None else None
    if r not in (2, 3):
        raise LrpcError(f"output '{value.name}' has rank {r}; lrpc explains outputs shaped [batch, classes] or "
                        "[batch, seq, classes]: choose one with --output")
    return value


def add_input(graph: ir.Graph, builder: Builder, name: str, dtype, shape) -> ir.Value:
    if name in builder.taken:
        raise LrpcError(f"the model already has a tensor named '{name}'; is it already an explainer? "
                        "compile the original model instead")
    builder.taken.add(name)
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    graph.inputs.append(value)
    return value


def add_output(graph: ir.Graph, builder: Builder, value: ir.Value, name: str, shape) -> None:
    if name in builder.taken:
        raise LrpcError(f"the model already has a tensor named '{name}'; is it already an explainer? "
                        "compile the original model instead")
    builder.taken.add(name)
    out = builder.Identity(value)
    out.name, out.type, out.shape = name, ir.TensorType(F32), ir.Shape(shape)
    graph.outputs.append(out)


def seed(graph: ir.Graph, b: Builder, y: ir.Value, mode: str, targets: int | str | None = None) -> ir.Value:
    """ĝ at the explained output: one-hot at (row, [position,] target), or the seed vector.

    With `targets` (K, an int or "dynamic"; docs/design.md, "Many targets: the K axis") the inputs are [batch, K] (the seed
    vector [batch, K, classes]) and ĝ gains a leading K axis: [K, batch, (seq,) classes], each of the K
    slices the single-target seed of one column.

    The graph checks these inputs itself (the run fails naming the input), because deployed explainers
    run without lrpc's Python checks: OneHot would turn an out-of-range index into an all-zero seed."""
    _refuse_reserved_names(graph)
    batch, classes = y.shape[0], y.shape[-1]
    per_row = [batch] if targets is None else [batch, k_dim(targets)]   # the index inputs' shape
    if mode == "vector":
        per_class = index_input = add_input(graph, b, SEED, F32, per_row + [classes])
        if targets is not None:
            per_class = _k_checked(b, per_class, y)
        per_class = checked(b, per_class, b.Not(b.Or(b.IsNaN(per_class), b.IsInf(per_class))), "finite", SEED)
    elif mode == "target":
        target = index_input = add_input(graph, b, TARGET, I64, per_row)
        if targets is not None:
            target = _k_checked(b, target, y)
        target = checked(b, target, _in_range(b, target, b.Shape(y, start=-1), negative=False), "in_range", TARGET)
        per_class = b.OneHot(target, b.Shape(y, start=-1), b.f32([0.0, 1.0]), axis=-1)
    else:
        raise LrpcError(f"unknown seed mode '{mode}': use 'target' or 'vector'")
    if targets is not None:
        per_class = b.Transpose(per_class, perm=[1, 0, 2])   # [K, batch, classes]
    if y.shape.rank() == 2:
        return per_class
    position = add_input(graph, b, POSITION, I64, per_row)
    seq = b.Shape(y, start=1, end=2)
    if targets is not None:  # one position per target: the same [batch, K] as the target / seed's first axes
        same = b.Equal(b.Shape(position), b.Shape(index_input, end=2))
        position = checked(b, position, same, "same_shape_as_" + index_input.name, POSITION)
    position = checked(b, position, _in_range(b, position, seq, negative=True), "in_range", POSITION)
    at_position = b.OneHot(position, seq, b.f32([0.0, 1.0]), axis=-1)  # negative: from end
    if targets is not None:
        at_position = b.Transpose(at_position, perm=[1, 0, 2])   # [K, batch, seq]
    return b.Mul(b.Unsqueeze(at_position, b.i64([-1])), b.Unsqueeze(per_class, b.i64([1 if targets is None else 2])))


def _k_checked(b: Builder, index: ir.Value, y: ir.Value) -> ir.Value:
    """A [batch, K, …] index input checked for K ≥ 1 and for the model's batch (a mismatched batch would
    otherwise fail deep in the relevance pass, or broadcast one row's targets over the batch)."""
    name = index.name
    index = checked(b, index, b.Greater(b.Shape(index, start=1, end=2), b.i64([0])), "nonempty", name)
    return checked(b, index, b.Equal(b.Shape(index, end=1), b.Shape(y, end=1)), "same_batch_as_model", name)


def k_dim(targets: int | str):
    """The K dimension of the explainer's [batch, K] inputs and its relevance outputs: K, or a named
    symbolic dim (the Builder reads a named dim from the graph input that carries it)."""
    return targets if isinstance(targets, int) else K_DIM


def _refuse_reserved_names(graph: ir.Graph) -> None:
    """The runtime tells the explainer's own inputs and outputs from the model's by these prefixes."""
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for value in values:
            if value.is_initializer():   # a weight listed among the inputs (old ir versions) is no input to feed
                continue
            if value.name.startswith(("lrp_", RELEVANCE_PREFIX)):
                raise LrpcError(f"the model has an {kind} named '{value.name}', but the names 'lrp_*' and "
                                f"'{RELEVANCE_PREFIX}*' are the explainer's own; rename it when exporting")


def _in_range(b: Builder, index: ir.Value, size: ir.Value, negative: bool) -> ir.Value:
    """index ∈ [0, size), or [−size, size) where negative indices count from the end."""
    low = b.Neg(size) if negative else b.i64([0])
    return b.And(b.GreaterOrEqual(index, low), b.Less(index, size))


def relevance_of(b: Builder, emitter, attribution: Attribution, grads: dict[ir.Value, ir.Value]) -> ir.Value:
    """R = x ⊙ ĝ_x; for token ids, taken at each embedding lookup and summed over the hidden axis. With a
    K axis (emitter.k_shape) R is [batch, K, *x.shape]."""
    x = attribution.input
    parts = []
    for point in attribution.points:
        if point not in grads:
            continue
        r = _times(b, emitter.as_f32(point), grads[point])
        if attribution.kind == "token":
            r = b.Reshape(b.ReduceSum(r, b.i64([-1]), keepdims=0), _grad_shape_of(b, emitter, x))
        parts.append(r)
    if not parts:  # the explained output does not depend on this input
        return _batch_first(b, emitter, b.ConstantOfShape(_grad_shape_of(b, emitter, x), value=ir.tensor([0.0], dtype=F32)), x)
    return _batch_first(b, emitter, parts[0] if len(parts) == 1 else b.Sum(*parts), x)


def latent_relevance(b: Builder, emitter, value: ir.Value, grads: dict[ir.Value, ir.Value]) -> ir.Value:
    if value not in grads:
        r = b.ConstantOfShape(_grad_shape_of(b, emitter, value), value=ir.tensor([0.0], dtype=F32))
    else:
        r = _times(b, emitter.as_f32(value), grads[value])
    return _batch_first(b, emitter, r, value)


def relevance_shape(value: ir.Value, targets: int | str | None) -> list:
    """The declared shape of relevance.<name>: the value's, with K after batch under --targets."""
    dims = list(value.shape or [])
    return dims if targets is None else dims[:1] + [k_dim(targets)] + dims[1:]


def _grad_shape_of(b: Builder, emitter, value: ir.Value) -> ir.Value:
    """The run-time shape of ĝ of a value: its own, with K in front when ĝ has a K axis."""
    shape = b.Shape(value)
    return shape if emitter.k_shape is None else b.Concat(emitter.k_shape, shape, axis=0)


def _batch_first(b: Builder, emitter, relevance: ir.Value, value: ir.Value) -> ir.Value:
    """[K, batch, …] → [batch, K, …] (the contract puts K after batch); unchanged without a K axis."""
    if emitter.k_shape is None:
        return relevance
    r = value.shape.rank() if value.shape is not None else None
    if r is None:
        raise LrpcError(f"--targets needs the rank of '{value.name}', which shape inference left unknown")
    if r == 0:   # a scalar has no batch axis: its relevance is [K]
        return relevance
    return b.Transpose(relevance, perm=[1, 0] + list(range(2, r + 1)))


def _times(b: Builder, x: ir.Value, grad: ir.Value) -> ir.Value:
    """x ⊙ ĝ with ±inf read as ±FLT_MAX, so a −inf mask value (or masked score) that receives nothing has
    relevance 0, not −inf · 0 = NaN (a Clip, not a Where: onnxruntime's Where is several times slower)."""
    big = float(np.finfo(np.float32).max)
    return b.Mul(b.Clip(x, b.f32(-big), b.f32(big)), grad)


def write_metadata(model: ir.Model, info: dict) -> None:
    model.metadata_props[METADATA_KEY] = json.dumps(info, sort_keys=True)


def read_metadata(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def peek_metadata(path) -> dict | None:
    """The explainer metadata of an ONNX file, read without loading its graph or weights: the ModelProto's
    top-level fields are walked and only metadata_props (field 14) is parsed. None if absent or unreadable."""
    import onnx
    found = {}
    try:
        with open(path, "rb") as f:
            def varint():
                shift = value = 0
                while True:
                    byte = f.read(1)
                    if not byte:
                        raise EOFError
                    value |= (byte[0] & 0x7F) << shift
                    if byte[0] < 0x80:
                        return value
                    shift += 7
            while True:
                try:
                    tag = varint()
                except EOFError:
                    break
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    varint()
                elif wire == 1:
                    f.seek(8, 1)
                elif wire == 5:
                    f.seek(4, 1)
                elif wire == 2:
                    size = varint()
                    if field == 14:
                        entry = onnx.StringStringEntryProto()
                        entry.ParseFromString(f.read(size))
                        found[entry.key] = entry.value
                    else:
                        f.seek(size, 1)
                else:
                    return None
    except Exception:  # not an ONNX file, truncated, …: no metadata
        return None
    return read_metadata(found)


def wants_low_memory(meta: dict | None) -> bool:
    """Explainers compiled with --checkpoint run without onnxruntime's weight pre-packing by default:
    pre-packed copies of every MatMul/Gemm weight (forward, rematerialised and relevance nodes each hold
    one) would otherwise dominate memory, which --checkpoint was asked to bound."""
    return bool(meta and (meta.get("checkpoint") or {}).get("segments"))


# onnxruntime (1.32 and earlier) segfaults while building a CPU session at ORT_ENABLE_ALL for some float16
# models with a Conv — a float16 torchvision-style ViT — inside its NchwcTransformer (an upstream bug).
# Such explainers record it and are loaded with that optimizer off (lrpc.runtime).
UNSAFE_FP16_CONV_OPTIMIZER = "NchwcTransformer"


def unsafe_optimizers(graph) -> list[str]:
    """The onnxruntime optimizers known to crash on this graph (a float16 Conv: the NchwcTransformer)."""
    fp16_conv = any(node.op_type == "Conv" and node.inputs[0] is not None
                    and node.inputs[0].dtype == ir.DataType.FLOAT16 for node in graph)
    return [UNSAFE_FP16_CONV_OPTIMIZER] if fp16_conv else []

