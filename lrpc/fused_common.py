"""What the decompositions of fused ops share (lrpc.decompose): the builder that inserts before the fused
node, small checks, and the RMSNorm and GELU chains as exporters write them."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from lrpc.errors import LrpcError
from lrpc.graph import Builder, _plain

MS = "com.microsoft"
# Where `protect_nonstandard_ops` moves onnxruntime's default-domain ops so that onnx's version converter
# leaves them alone.
PROTECTED_DOMAIN = "lrp.ort"
GELU_OPSET = 20
LOWEST = float(np.finfo(np.float32).min)



class Inserter(Builder):
    """lrpc's Builder, but new nodes go before the fused node being replaced (`anchor`)."""

    anchor: ir.Node | None = None                 # the fused node being replaced
    dtype: ir.DataType = ir.DataType.FLOAT        # its float type (for constants)
    model: ir.Model | None = None
    dirty = False                                 # the graph changed since shapes were last inferred
    changed = False                               # the graph changed at all

    def op(self, op_type: str, *inputs, _domain: str = "", _outputs: int = 1, **attrs):
        attrs = {k: _plain(v) for k, v in attrs.items() if v is not None}
        outputs = [ir.Value(name=self.fresh(op_type.lower())) for _ in range(_outputs)]
        node = ir.Node(_domain, op_type, inputs, ir.convenience.convert_attributes(attrs),
                       outputs=outputs, name=self.fresh(op_type))
        self.graph.insert_before(self.anchor, node)
        self.dirty = True
        return outputs[0] if _outputs == 1 else tuple(outputs)

    def rank(self, value: ir.Value | None) -> int | None:
        if value is not None and value.shape is None and self.dirty:
            self.infer()
        return rank_of(value)

    def dim(self, value: ir.Value | None, axis: int):
        if value is not None and value.shape is None and self.dirty:
            self.infer()
        return static_dim(value, axis)

    def infer(self) -> None:
        """Shapes of what earlier decompositions made (ops onnx does not know have none): re-infer."""
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(self.model)
        self.dirty = False

    def scalar(self, value: float) -> ir.Value:
        """A float constant of the fused node's float type."""
        return self.const(np.asarray(value, dtype=self.dtype.numpy()), hint="c")

    def dim_scalar(self, value: ir.Value, axis: int) -> ir.Value:
        """One dimension of `value` as an int64 scalar (for Range)."""
        end = axis + 1 if axis != -1 else None
        return self.Squeeze(self.Shape(value, start=axis, end=end), self.i64([0]))


# ---- small helpers -------------------------------------------------------------------------------

def fail(node: ir.Node, what: str) -> LrpcError:
    return LrpcError(f"node '{node.name}' ({node.domain + '.' if node.domain else ''}{node.op_type}): {what} is not "
                     "supported by lrpc's decomposition of fused ops; export the model without this fusion")


def optional_input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i] is not None else None


def used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def output_used(node: ir.Node, i: int) -> bool:
    return len(node.outputs) > i and used(node.outputs[i])


def require_unused(node: ir.Node, indices, names) -> None:
    for i, name in zip(indices, names):
        if output_used(node, i):
            raise fail(node, f"its output {i} ('{name}') being used")


def float_type(node: ir.Node, *candidates: int) -> ir.DataType:
    for i in candidates:
        v = optional_input(node, i)
        if v is not None and v.dtype is not None and v.dtype.is_floating_point():
            return v.dtype
    return ir.DataType.FLOAT


def static_dim(value: ir.Value | None, axis: int):
    if value is None or value.shape is None or value.shape.rank() is None:
        return None
    try:
        return value.shape[axis]
    except IndexError:
        return None


def rank_of(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def norm_axes(b: Inserter, node: ir.Node, x: ir.Value, axis: int) -> ir.Value:
    if axis < 0:
        return b.i64(list(range(axis, 0)))
    r = b.rank(x)
    if r is None:
        raise fail(node, f"axis={axis} with an input of unknown rank")
    return b.i64(list(range(axis, r)))


def rms_norm(b: Inserter, x: ir.Value, w: ir.Value | None, eps: float, axes: ir.Value,
              dtype: ir.DataType) -> ir.Value:
    """RMSNorm as exporters write it: x · Reciprocal(Sqrt(ReduceMean(x²) + ε)) · w (statistic a separate tensor)."""
    low_precision = dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
    h = b.Cast(x, to=ir.DataType.FLOAT) if low_precision else x
    saved, b.dtype = b.dtype, (ir.DataType.FLOAT if low_precision else dtype)
    inv = b.Reciprocal(b.Sqrt(b.Add(b.ReduceMean(b.Pow(h, b.scalar(2.0)), axes, keepdims=1), b.scalar(eps))))
    b.dtype = saved
    y = b.Mul(h, inv)
    if low_precision:
        y = b.Cast(y, to=dtype)
    return y if w is None else b.Mul(y, w)


def gelu(b: Inserter, x: ir.Value, approximate: str, opset: int) -> ir.Value:
    """Gelu (opset ≥ 20), else the chain exporters emit at older opsets (erf, or GPT-2's tanh form)."""
    if opset >= GELU_OPSET:
        return b.Gelu(x, approximate=approximate)
    if approximate == "tanh":
        inner = b.Mul(b.scalar(math.sqrt(2.0 / math.pi)),
                      b.Add(x, b.Mul(b.scalar(0.044715), b.Pow(x, b.scalar(3.0)))))
        return b.Mul(b.Mul(b.scalar(0.5), x), b.Add(b.scalar(1.0), b.Tanh(inner)))
    return b.Mul(b.Mul(x, b.Add(b.Erf(b.Div(x, b.scalar(math.sqrt(2.0)))), b.scalar(1.0))), b.scalar(0.5))
