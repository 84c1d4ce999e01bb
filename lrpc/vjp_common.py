"""Small pieces the VJPs (and the rules) share (docs/design.md, "Relevance semantics").

A VJP receives `n`, the rule context (lrpc.context.Context: the node's forward values in float32, the
builder, its attributes, the ĝ of its outputs) and `g`, ĝ of its first output. It returns one entry per
input: a thunk that emits ĝ for that input, or None where nothing flows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.errors import LrpcError


def same(g):
    return (lambda: g,)


def reshape_back(n, g):
    # a 0 in a Reshape target copies ĝ's dim unless allowzero: a zero-sized input keeps its zero
    dims = n.dims(0)
    literal = {"allowzero": 1} if dims is not None and 0 in dims else {}
    return (lambda: n.b.Reshape(g, n.grad_shape(0), **literal),)


def pointwise(derivative):
    """Rows for y = f(x): ĝ_x = ĝ_y ⊙ f'(x), with f' written in terms of n (x = n.x(0), y = n.y())."""
    return lambda n, g: (lambda: n.b.Mul(g, derivative(n)),)


def forward_dims(n, i: int = 0) -> list | None:
    """Input i's forward dims (without ĝ's K axis; `n.dims` gives ĝ's), None if its rank is unknown."""
    v = n.raw(i)
    return None if v is None or v.shape is None else list(v.shape)


def refuse(n, why: str):
    """Refuse the node in one line naming it, its op and why."""
    raise LrpcError(f"node '{n.node.name}' ({n.node.op_type}): {why}")


def has_axes(n) -> bool:
    """Whether a reduction names its axes (an input, non-empty when known, or the attribute)."""
    if len(n.inputs) > 1 and n.inputs[1] is not None:
        known = n.const(1)
        return known is None or known.size > 0
    return bool(n.attr("axes"))


def reduced_axes(n):
    """A reduction's axes as an int64 tensor (None: all), from the input (opset ≥ 18) or the attribute."""
    if not has_axes(n):
        return None
    if len(n.inputs) > 1 and n.inputs[1] is not None:
        return n.b.Cast(n.raw(1), to=7)
    axes = n.attr("axes")
    return n.b.i64(list(axes)) if axes else None


def kept(n, value):
    """A reduction output (or its ĝ) shaped to broadcast against the input (the keepdims=1 form)."""
    axes = reduced_axes(n)
    return value if n.attr("keepdims", 1) or axes is None else n.b.Unsqueeze(value, axes)


def reduce(n, g, scale=None):
    """ĝ of a reduction: ĝ_y with the reduced axes back (if dropped), broadcast to x, times ∂y/∂x."""
    axes, b = reduced_axes(n), n.b
    if not n.attr("keepdims", 1) and axes is not None:
        g = b.Unsqueeze(g, n.grad_axes(axes))   # axes of ĝ (a K axis shifts them)
    elif not n.attr("keepdims", 1):   # all axes dropped
        g = scalar_against(n, g, n.raw(0))
    grad = b.Expand(g, b.Shape(n.raw(0)))    # broadcasts: a K axis of ĝ stays
    return grad if scale is None else n.b.Mul(grad, scale(n))


def scalar_against(n, g, value):
    """ĝ of a scalar, made to broadcast against the forward `value`: under --targets ĝ [K] → [K, 1, …, 1]
    (K in front of value's axes, not aligned with its last); as it is otherwise."""
    if not n.lead:
        return g
    b = n.b
    ones = b.ConstantOfShape(b.Shape(b.Shape(value)), value=ir.tensor([1], dtype=ir.DataType.INT64))
    return b.Reshape(g, b.Concat(n.k_shape, ones, axis=0))


def mean_scale(n):
    b = n.b  # 1/N with N = |x| / |y|, the number of elements averaged into each output
    return b.Div(b.Cast(b.Size(n.raw_out(0)), to=1), b.Cast(b.Size(n.raw(0)), to=1))


def stabilised(b, z, eps: float):
    """z + ε·sign(z), sign(0) = 1. Written as z + (2ε·[z ≥ 0] − ε), bit-identical to a Where on the sign but
    elementwise arithmetic only (onnxruntime's broadcasting Where is several times slower on CPU)."""
    step = b.Cast(b.GreaterOrEqual(z, b.f32(0.0)), to=1)
    return b.Add(z, b.Sub(b.Mul(step, b.f32(2 * np.float32(eps))), b.f32(eps)))


def along_axis(b, t, axis: int, rank: int, matrix):
    """t [..., d_axis, ...] times matrix [d_axis, e] along `axis`: [..., e, ...]."""
    last = rank - 1
    swap = list(range(rank))
    swap[axis], swap[last] = last, axis
    moved = t if axis == last else b.Transpose(t, perm=swap)
    product = b.MatMul(moved, matrix)
    return product if axis == last else b.Transpose(product, perm=swap)
