"""VJPs of the ops that scatter or select by index: CumSum, ScatterElements/ScatterND, TopK, MaxUnpool, Compress.
Index inputs get no ĝ."""

from __future__ import annotations

from lrpc.vjp_common import refuse


def cumsum(n, g):
    """The transpose of a (reverse, exclusive) running sum is the running sum the other way."""
    return (lambda: n.b.CumSum(g, n.raw(1), exclusive=n.attr("exclusive", 0), reverse=1 - n.attr("reverse", 0)),
            None)


def scatter_elements(n, g):
    """data's ĝ is ĝ_y with the overwritten positions zeroed (all of ĝ_y with reduction=add);
    the updates' ĝ is ĝ_y read at their positions."""
    b, reduction, axis = n.b, n.attr("reduction", "none"), n.attr("axis", 0)
    if reduction not in ("none", "add"):
        refuse(n, f"reduction={reduction} is not supported")
    data = (lambda: g) if reduction == "add" else \
        (lambda: b.ScatterElements(g, n.raw(1), n.zeros_like(b.Shape(n.raw(2))), axis=n.grad_axis(axis)))
    return (data, None, lambda: b.GatherElements(g, n.raw(1), axis=n.grad_axis(axis)))


def scatter_nd(n, g):
    b, reduction = n.b, n.attr("reduction", "none")
    if reduction not in ("none", "add"):
        refuse(n, f"reduction={reduction} is not supported")
    data = (lambda: g) if reduction == "add" else \
        (lambda: b.ScatterND(g, n.raw(1), n.zeros_like(b.Shape(n.raw(2)))))
    return (data, None, lambda: b.GatherND(g, n.raw(1)))


def top_k(n, g):
    """The values output: ĝ_x scatters ĝ_values to the indices they were read from (indices: no ĝ)."""
    b = n.b
    axis = n.attr("axis", -1)
    grad_values = n.grads[0]
    if grad_values is None:
        return (None, None)
    return (lambda: b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), n.raw_out(1), grad_values, axis=n.grad_axis(axis),
                                      reduction="add"), None)


def max_unpool(n, g):
    """y[indices[j]] = x[j] (flat indices over the whole tensor): ĝ_x = ĝ_y read at the indices."""
    b = n.b
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        refuse(n, "an explicit output_shape is not supported")
    flat = b.i64([-1])
    return (lambda: b.Reshape(b.Gather(b.Reshape(g, flat), b.Reshape(n.raw(1), flat)), b.Shape(n.raw(0))),
            None, None)


def compress(n, g):
    """y = x at the true positions of the condition along `axis` (of the flattened x without it):
    ĝ_x scatters ĝ_y back to those positions."""
    b, axis = n.b, n.attr("axis")

    def grad():
        picked = b.Reshape(b.NonZero(n.raw(1)), b.i64([-1]))
        if axis is None:
            flat = b.i64([-1])
            zeros = n.zeros_like(b.Shape(b.Reshape(n.raw(0), flat)))
            return b.Reshape(b.ScatterElements(zeros, picked, b.Reshape(g, flat), axis=0), b.Shape(n.raw(0)))
        r = n.rank(0)
        if r is None:
            refuse(n, "input rank unknown")
        a = axis % r
        index = b.Expand(b.Reshape(picked, b.i64([1] * a + [-1] + [1] * (r - a - 1))), b.Shape(g))
        return b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), index, g, axis=n.grad_axis(a))
    return (grad, None)
