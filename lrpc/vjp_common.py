"""Small pieces the VJPs (and the rules) share (docs/design.md, "Relevance semantics").

A VJP receives `n`, the rule context (lrpc.context.Context: the node's forward values in float32, the
builder, its attributes, the ĝ of its outputs) and `g`, ĝ of its first output. It returns one entry per
input: a thunk that emits ĝ for that input, or None where nothing flows.
"""

from __future__ import annotations

import numpy as np


def same(g):
    return (lambda: g,)


def reshape_back(n, g):
    return (lambda: n.b.Reshape(g, n.grad_shape(0)),)


def pointwise(derivative):
    """Rows for y = f(x): ĝ_x = ĝ_y ⊙ f'(x), with f' written in terms of n (x = n.x(0), y = n.y())."""
    return lambda n, g: (lambda: n.b.Mul(g, derivative(n)),)



def reduce(n, g, scale=None):
    """ĝ of a reduction: unsqueeze the reduced axes back (if dropped), broadcast to x, scale by ∂y/∂x."""
    b, x = n.b, n.raw(0)
    axes = n.raw(1) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    keep = n.attr("keepdims", 1)
    if not keep and axes is not None:
        g = b.Unsqueeze(g, n.grad_axes(b.Cast(axes, to=7)))
    grad = b.Expand(g, b.Shape(x))  # broadcasts: a K axis of ĝ stays
    return grad if scale is None else b.Mul(grad, scale(n, keep, axes))


def kept(n, value, keep, axes):
    """A reduction output reshaped so it broadcasts against the input (keepdims=1 form)."""
    return value if keep or axes is None else n.b.Unsqueeze(value, n.b.Cast(axes, to=7))


def mean_scale(n, keep, axes):
    b = n.b  # 1/N with N = |x| / |y|, the number of elements averaged into each output
    return b.Div(b.Cast(b.Size(n.raw_out(0)), to=1), b.Cast(b.Size(n.raw(0)), to=1))


def stabilised(b, z, eps: float):
    """z + ε·sign(z), sign(0) = 1. Written as z + (2ε·[z ≥ 0] − ε), bit-identical to a Where on the sign but
    elementwise arithmetic only (onnxruntime's broadcasting Where is several times slower on CPU)."""
    step = b.Cast(b.GreaterOrEqual(z, b.f32(0.0)), to=1)
    return b.Add(z, b.Sub(b.Mul(step, b.f32(2 * np.float32(eps))), b.f32(eps)))
