"""Small helpers over onnx-ir: a node builder for everything lrpc adds, and attribute/constant access."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
PREFIX = "lrp_"
INPUT_CHECK = "check_"   # contract's in-graph input checks are named lrp_check_… (rows follows them)


DECOMPOSITION = "lrpc.decomposition"   # node.meta key of a fused node's decomposed outputs (lrpc.ops.ALIAS)


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is an initializer or a Constant's output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def weight_array(value: ir.Value | None) -> np.ndarray | None:
    """const_array, or for a DequantizeLinear of constants (a quantized model's weight) the float it stands for,
    (q − zero_point) · scale with a per-axis scale along `axis`; None otherwise (blocked quantization too)."""
    array = const_array(value)
    node = value.producer() if array is None and value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or attr(node, "block_size", 0):
        return array
    q, scale, zero = (const_array(v) if v is not None else None for v in (list(node.inputs) + [None])[:3])
    if q is None or scale is None or (zero is None and len(node.inputs) > 2 and node.inputs[2] is not None):
        return None
    centred = q.astype(np.float32) - (0 if zero is None else zero.astype(np.float32))
    if scale.ndim == 1 and q.ndim > 1:   # per axis
        shape = [1] * q.ndim
        shape[attr(node, "axis", 1) % q.ndim] = -1
        scale = scale.reshape(shape)
    return (centred * scale).astype(scale.dtype)


def static_value(value: ir.Value | None, depth: int = 16) -> np.ndarray | None:
    """The value of a small tensor that is constant in fact though computed at run time, as TorchScript
    exports compute slice bounds and reshape targets (Shape → Gather → Div → Unsqueeze), else None.
    Evaluates integer shape arithmetic (and Size, Equal) over static dims; never a tensor of more than 64 elements."""
    array = const_array(value)
    if array is not None or value is None or depth == 0:
        return array if array is None or array.size <= 64 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Shape":
        dims = static_dims(node.inputs[0], attr(node, "start", 0), attr(node, "end"))
        return None if dims is None else np.asarray(dims, np.int64)
    if node.op_type == "Size":   # (a function body's test of its input's rank: AffineGrid's If)
        dims = static_dims(node.inputs[0])
        return None if dims is None else np.asarray(int(np.prod(dims)), np.int64)
    shape_of = node.inputs[0].producer() if node.op_type == "Gather" and node.inputs[0] is not None else None
    if shape_of is not None and shape_of.op_type == "Shape" and shape_of.inputs[0].shape is not None:
        # static dims picked out of a partly symbolic shape: Gather(Shape(x), 3) of x [batch, 8, seq, 64]
        index = static_value(node.inputs[1], depth - 1)
        dims = list(shape_of.inputs[0].shape)[attr(shape_of, "start", 0):attr(shape_of, "end")]
        if index is None or attr(node, "axis", 0) != 0:
            return None
        picked = [dims[int(i)] for i in np.ravel(index)]
        ok = all(isinstance(d, int) for d in picked)
        return np.asarray(picked, np.int64).reshape(index.shape) if ok else None
    args = [static_value(v, depth - 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(args, node.inputs) if v is not None):
        return None
    try:
        result = _evaluate(node, args)
    except (ValueError, IndexError, TypeError, ZeroDivisionError):  # numpy.exceptions.AxisError is a ValueError
        return None  # not computable as written (the model's own shape inference would have refused it)
    return result if result is None or result.size <= 64 else None


def _evaluate(node: ir.Node, args: list) -> np.ndarray | None:
    op = node.op_type
    if op in ("Identity", "Cast") and args[0].dtype.kind in "iub":
        dtype = ir.DataType(attr(node, "to")).numpy() if op == "Cast" else args[0].dtype
        return args[0].astype(dtype) if np.dtype(dtype).kind in "iu" else None
    if any(a is not None and a.dtype.kind not in "iu" for a in args):
        return None  # integer shape arithmetic only
    if op == "Gather":
        return np.take(args[0], args[1], axis=attr(node, "axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = [int(a) for a in args[1]] if len(args) > 1 and args[1] is not None else None
        if op == "Squeeze":
            return np.squeeze(args[0], axis=tuple(axes) if axes is not None else None)
        out_rank = args[0].ndim + len(axes)
        return np.expand_dims(args[0], tuple(sorted(a % out_rank for a in axes)))
    if op == "Concat":
        return np.concatenate(args, axis=attr(node, "axis"))
    if op in ("Add", "Sub", "Mul", "Max", "Min"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum,
                "Min": np.minimum}[op](*args).astype(args[0].dtype)
    if op == "Equal":
        return np.equal(*args)
    if op == "Div":  # ONNX integer division truncates toward zero
        return (np.sign(args[0]) * np.sign(args[1]) * (np.abs(args[0]) // np.abs(args[1]))).astype(args[0].dtype)
    return None


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbolic dim."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    a_name, b_name = getattr(a, "value", None), getattr(b, "value", None)
    return a_name is not None and a_name == b_name


def static_dims(value: ir.Value | None, start: int = 0, end: int | None = None) -> list[int] | None:
    """shape(value)[start:end] when all those dims are known integers, else None."""
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)[start:end]
    return dims if all(isinstance(d, int) for d in dims) else None


def _undoes(producer: ir.Node | None, perm) -> bool:
    """Whether Transpose(·, perm) undoes `producer` (a Transpose with explicit perm p: p[perm[k]] = k)."""
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx") or perm is None:
        return False
    first = attr(producer, "perm")
    return first is not None and len(first) == len(perm) and all(first[q] == k for k, q in enumerate(perm))


def all_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | {v.name for v in graph.outputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
        if node.name:
            names.add(node.name)
    return names


def _plain(value):
    """numpy scalars (and lists of them) as Python numbers, which onnx-ir's attribute conversion expects."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


class Builder:
    """Appends new nodes and constants to a graph; every name it makes starts with `lrp_` and is unique.

    Any attribute lookup that starts with a capital letter is an ONNX op: ``b.Mul(x, y)`` adds a
    Mul node and returns its output; ``b.Split(x, num_outputs=2, _outputs=2)`` returns a tuple.
    ``b.Shape(x)`` folds to a constant when the dims it reads are static (each Shape node left in the
    relevance graph costs a kernel launch per run, and the shape arithmetic behind it a few more), and
    ``b.Transpose(b.Transpose(x, p), q)`` is x itself when q undoes p (also through a product with a scalar
    constant, which commutes with any transpose), and a Reshape of a Reshape reshapes the inner input.
    """

    def __init__(self, graph: ir.Graph, prefix: str = PREFIX):
        """prefix: of every name made (a forward rewrite names its nodes apart from the relevance's lrp_)."""
        self.graph = graph
        self.prefix = prefix
        self.taken = all_names(graph)
        self._counter = itertools.count()
        self._consts: dict[tuple, ir.Value] = {}
        self._dim_sources: dict[str, tuple[ir.Value, int]] | None = None

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.prefix}{hint}_{next(self._counter)}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, *inputs: ir.Value | None, _domain: str = "", _outputs: int = 1,
           _keep: bool = False, **attrs):
        """_keep: emit the node even where it could be folded (a run-time data dependency is the point)."""
        attrs = {k: _plain(v) for k, v in attrs.items() if v is not None}
        if op_type == "Shape" and not _domain and not _keep:
            dims = static_dims(inputs[0], attrs.get("start", 0), attrs.get("end"))
            if dims is not None:
                return self.i64(dims)
        if op_type == "Reshape" and not _domain and not attrs.get("allowzero"):
            inner = inputs[0].producer()  # Reshape(Reshape(x, s), t) = Reshape(x, t)
            target = const_array(inputs[1])
            if inner is not None and inner.op_type == "Reshape" and inner.domain in ("", "ai.onnx") \
                    and not attr(inner, "allowzero", 0) and (target is None or 0 not in target):
                inputs = (inner.inputs[0], *inputs[1:])
        if op_type == "Transpose" and not _domain:
            folded = self._fold_transpose(inputs[0], attrs.get("perm"))
            if folded is not None:
                return folded
        outputs = [ir.Value(name=self.fresh(op_type.lower())) for _ in range(_outputs)]
        node = ir.Node(_domain, op_type, inputs, ir.convenience.convert_attributes(attrs),
                       outputs=outputs, name=self.fresh(op_type))
        self.graph.append(node)
        return outputs[0] if _outputs == 1 else tuple(outputs)

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def const(self, array, dtype=None, hint: str = "const") -> ir.Value:
        """A constant as an initializer; identical small constants are shared."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        value = ir.Value(name=self.fresh(hint), const_value=ir.tensor(array),
                         shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        value.const_value.name = value.name
        self.graph.register_initializer(value)
        if key is not None:
            self._consts[key] = value
        return value

    def _fold_transpose(self, value: ir.Value, perm) -> ir.Value | None:
        producer = value.producer()
        if _undoes(producer, perm):
            return producer.inputs[0]
        if producer is not None and producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
            for i in (0, 1):
                c = producer.inputs[1 - i]
                if c is not None and c.shape is not None and c.shape.rank() == 0 and _undoes(
                        producer.inputs[i].producer(), perm):
                    return self.Mul(producer.inputs[i].producer().inputs[0], c)
        return None

    def reshape_shape(self, dims: list | None) -> ir.Value | None:
        """dims as a Reshape shape: a constant when at most one of them is symbolic (written -1); else the
        symbolic dims read once from the graph inputs that carry them (e.g. batch and sequence from
        input_ids), so every Reshape to that shape shares one Concat; None when some dim has no source, or
        when a symbolic dim sits beside a 0."""
        if dims is None:
            return None
        symbolic = [d for d in dims if not isinstance(d, int)]
        if 0 in dims and symbolic:  # a −1 beside a 0 is ambiguous under allowzero: read the dims at run time
            return None
        if len(symbolic) <= 1:
            return self.i64([d if isinstance(d, int) else -1 for d in dims])
        if self._dim_sources is None:
            self._dim_sources = {}
            for v in self.graph.inputs:
                for axis, d in enumerate(v.shape or []):
                    if not isinstance(d, int) and getattr(d, "value", None):
                        self._dim_sources.setdefault(d.value, (v, axis))
        if any(getattr(d, "value", None) not in self._dim_sources for d in symbolic):
            return None
        pieces, ints = [], []
        for d in dims:
            if isinstance(d, int):
                ints.append(d)
                continue
            if ints:
                pieces.append(self.i64(ints))
                ints = []
            source, axis = self._dim_sources[d.value]
            pieces.append(self.Shape(source, start=axis, end=axis + 1))
        if ints:
            pieces.append(self.i64(ints))
        return self.Concat(*pieces, axis=0)

    def i64(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), hint="i64")

    def f32(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.float32), hint="f32")


def outer_captures(node: ir.Node) -> list[ir.Value]:
    """The outer-scope tensors the subgraphs of `node` (If, Loop, Scan) read: inputs of their nodes that no
    subgraph defines. They feed the node's outputs as much as its inputs do."""
    graphs, defined, read = subgraphs(node), set(), []
    while graphs:
        graph = graphs.pop()
        defined.update(graph.inputs)
        defined.update(graph.initializers.values())
        for inner in graph:
            defined.update(inner.outputs)
            read.extend(i for i in inner.inputs if i is not None)
            graphs += subgraphs(inner)
    return [v for v in read if v not in defined]


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    return graphs + [g for a in node.attributes.values() if a.type == ir.AttributeType.GRAPHS for g in a.value]


def is_input_check(node: ir.Node | None) -> bool:
    """contract's check of an explainer input: a Reshape named lrp_check_… that passes its input through."""
    return node is not None and node.op_type == "Reshape" and (node.name or "").startswith(PREFIX + INPUT_CHECK)


def checked(b: Builder, value: ir.Value, ok: ir.Value, test: str, subject: str | None = None) -> ir.Value:
    """`value` itself, read through a Reshape to its own shape plus `bad` (1 if any entry fails `ok`, else
    0): a no-op when every entry passes, an impossible shape (more elements) otherwise, so the run fails
    with onnxruntime naming the node, lrp_check_<input>_<test>. The relevance reads the Reshape's output:
    a data dependency no optimiser may drop, and no branch (works alike on every execution provider).
    allowzero=1 (a 0 in the shape is a real 0: only an empty input has one) is what stops the Builder
    from merging a later Reshape of the checked value into this one, which would skip the check. `subject`:
    the name the node gives (default: the value's; an input checked several times keeps its own name)."""
    bad = b.ReduceSum(b.Cast(b.Not(ok), to=ir.DataType.INT64.value), keepdims=0)  # an empty batch has nothing bad
    out = ir.Value(name=b.fresh(f"checked_{value.name}"), type=value.type, shape=value.shape)
    b.graph.append(ir.Node("", "Reshape", [value, b.Add(b.Shape(value), bad)], outputs=[out],
                           attributes=[ir.AttrInt64("allowzero", 1)],  # also keeps Builder from folding it
                           name=b.fresh(f"{INPUT_CHECK}{subject or value.name}_{test}")))
    return out
