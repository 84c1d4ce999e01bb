"""VJPs of the ops that scatter or select by index: CumSum, CumProd, ScatterElements/ScatterND, OneHot, TopK,
MaxUnpool, Compress, TensorScatter.
Index inputs get no ĝ."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.vjp_common import refuse

F32 = ir.DataType.FLOAT


def cumsum(n, g):
    """The transpose of a (reverse, exclusive) running sum is the running sum the other way (along the same
    axis of ĝ, which is one further under --targets)."""
    def grad():
        axis = n.grad_axes(n.b.Cast(n.raw(1), to=7)) if n.lead else n.raw(1)
        return n.b.CumSum(g, axis, exclusive=n.attr("exclusive", 0), reverse=1 - n.attr("reverse", 0))
    return (grad, None)


PRODUCT_LIMIT = 1 << 26   # floats in CumProd's [L, *x] table of partial products: beyond it the op is refused


def cumprod(n, g):
    """∂y_i/∂x_k = Π_{j ∈ window(i), j ≠ k} x_j for k in y_i's window, else 0, formed without dividing by x_k
    (which may be 0): the running product of x with x_k replaced by 1, for every k at once ([L, *x], L the
    axis length), times the window mask, which is the running sum of the one-hot e_k with the node's own
    exclusive / reverse; ĝ_x[k] = Σ_i ĝ_y[i] ∂y_i/∂x_k. The axis may be a run-time input."""
    b, r = n.b, n.rank(0)
    if r is None:
        refuse(n, "the rank of the input must be known")
    dims = n.raw(0).shape
    if dims is not None and all(isinstance(d, int) for d in dims) and max(dims, default=0) * int(np.prod(dims)) > \
            PRODUCT_LIMIT:
        refuse(n, f"its table of partial products (up to {max(dims)} × {int(np.prod(dims))}) is too large")
    modes = {"exclusive": n.attr("exclusive", 0), "reverse": n.attr("reverse", 0)}

    def grad():
        a = b.Mod(b.Add(b.Reshape(b.Cast(n.raw(1), to=7), b.i64([1])), b.i64(r)), b.i64(r))   # [1], in [0, r)
        length = b.Gather(b.Shape(n.raw(0)), a)
        eye = b.EyeLike(b.ConstantOfShape(b.Concat(length, length, axis=0), value=ir.tensor([0.0], dtype=F32)))
        along = b.ScatterElements(b.i64([1] * r), a, length, axis=0)                     # [1, …, L at a, …, 1]
        onehot = b.Reshape(eye, b.Concat(length, along, axis=0))                          # [L(k), e_k along a]
        inner = b.Reshape(b.Add(a, b.i64(1)), b.i64([]))
        others = b.CumProd(b.Where(b.Cast(onehot, to=9), b.f32(1.0), n.x(0)), inner, **modes)   # [L, *x]
        window = b.CumSum(onehot, inner, **modes)
        lead = n.lead
        summed = b.ReduceSum(b.Mul(b.Unsqueeze(g, b.i64([lead])), b.Mul(others, window)), b.Add(a, b.i64(lead + 1)),
                             keepdims=1)                                                   # [(K,) L(k), *x, i → 1]
        return b.ReduceSum(b.Mul(summed, onehot), b.i64([lead]), keepdims=0)               # k back along a
    return (grad, None)


def scatter_elements(n, g):
    """data's ĝ is ĝ_y with the overwritten positions zeroed (all of ĝ_y with reduction=add);
    the updates' ĝ is ĝ_y read at their positions."""
    b, axis = n.b, n.attr("axis", 0)

    def index(k):   # on a ĝ with a K axis: the indices once per K slice
        return b.Expand(n.raw(1), b.Concat(n.k_shape, b.Shape(n.raw(1)), axis=0)) if k else n.raw(1)
    return _scatter(n, g, lambda v, u, k=False, **kw: b.ScatterElements(v, index(k), u, axis=n.grad_axis(axis) if k
                                                                        else axis, **kw),
                    lambda v, k=False: b.GatherElements(v, index(k), axis=n.grad_axis(axis) if k else axis))


def scatter_nd(n, g):
    b = n.b
    index = lambda k: k_indices(n, n.raw(1)) if k else n.raw(1)  # noqa: E731
    return _scatter(n, g, lambda v, u, k=False, **kw: b.ScatterND(v, index(k), u, **kw),
                    lambda v, k=False: b.GatherND(v, index(k)))


def k_indices(n, index: ir.Value) -> ir.Value:
    """GatherND / ScatterND indices [*q, m] for a ĝ with a K axis: [K, *q, m + 1], slice k's own index in
    front of each tuple, so each K slice is read or written alone."""
    b = n.b
    index = b.Cast(index, to=7)
    ones = b.ConstantOfShape(b.Shape(b.Shape(index)), value=ir.tensor([1], dtype=ir.DataType.INT64))
    ks = b.Reshape(b.Range(b.i64(0), b.Reshape(n.k_shape, b.i64([])), b.i64(1)), b.Concat(n.k_shape, ones, axis=0))
    ks = b.Expand(ks, b.Concat(n.k_shape, b.Shape(index, end=-1), b.i64([1]), axis=0))
    return b.Concat(ks, b.Expand(index, b.Concat(n.k_shape, b.Shape(index), axis=0)), axis=-1)


def _scatter(n, g, scatter, gather):
    """The VJPs of a scatter (`scatter(v, updates, k, reduction=…)` / `gather(v, k)` at the node's indices;
    k: v is a ĝ with a K axis, not a forward value). With reduction max/min ĝ_y goes to the data or updates
    equal to y, split evenly between ties."""
    b, reduction, k = n.b, n.attr("reduction", "none"), bool(n.lead)
    if reduction == "add":
        return (lambda: g, None, lambda: gather(g, k))
    if reduction == "none":
        return (lambda: scatter(g, n.grad_zeros(2), k), None, lambda: gather(g, k))
    if reduction == "mul":
        return _scatter_product(n, g, scatter, gather)
    if reduction not in ("max", "min"):
        refuse(n, f"reduction={reduction} is not supported")
    y = n.y()
    hit_data = n.cached("hit_data", lambda: b.Cast(b.Equal(n.x(0), y), to=1))
    hit_updates = n.cached("hit_updates", lambda: b.Cast(b.Equal(n.x(2), gather(y)), to=1))
    share = n.cached("share", lambda: b.Div(g, scatter(hit_data(), hit_updates(), reduction="add")))
    return (lambda: b.Mul(share(), hit_data()), None, lambda: b.Mul(gather(share(), bool(n.lead)), hit_updates()))


def _scatter_product(n, g, scatter, gather):
    """reduction=mul: y = data ⊙ Π (updates at that position). ĝ_data = ĝ_y ⊙ Π updates; an update's ĝ is
    ĝ_y ⊙ data ⊙ Π (the other updates at its position), formed without dividing by a zero update: P is the
    product of the non-zero updates at a position, Z the count of zero ones."""
    b = n.b
    zero = b.Equal(n.x(2), b.f32(0.0))
    is_zero, nonzero = b.Cast(zero, to=1), b.Where(zero, b.f32(1.0), n.x(2))
    base = n.zeros_like(b.Shape(n.raw(0)))
    products = n.cached("products", lambda: scatter(b.Add(base, b.f32(1.0)), nonzero, reduction="mul"))
    zeros = n.cached("zeros", lambda: scatter(base, is_zero, reduction="add"))

    def others():
        return b.Where(b.Equal(b.Sub(gather(zeros()), is_zero), b.f32(0.0)), b.Div(gather(products()), nonzero),
                       b.f32(0.0))
    return (lambda: b.Mul(g, b.Where(b.Equal(zeros(), b.f32(0.0)), products(), b.f32(0.0))), None,
            lambda: b.Mul(gather(b.Mul(g, n.x(0)), bool(n.lead)), others()))


def one_hot(n, g):
    """y = on where the index is hot, off elsewhere: ĝ_values = [Σ ĝ off the hot positions, Σ ĝ on them]."""
    b, r = n.b, n.rank(0)
    if r is None:
        refuse(n, "the rank of the indices must be known")

    def grad():
        hot = b.OneHot(n.raw(0), n.raw(1), b.f32([0.0, 1.0]), axis=n.attr("axis", -1))
        every = b.i64(list(range(n.lead, n.lead + r + 1)))
        on = b.ReduceSum(b.Mul(g, hot), every, keepdims=0)
        off = b.Sub(b.ReduceSum(g, every, keepdims=0), on)
        return b.Concat(b.Unsqueeze(off, b.i64([-1])), b.Unsqueeze(on, b.i64([-1])), axis=-1)   # [(K,) 2]
    return (None, None, grad)


def top_k(n, g):
    """The values output: ĝ_x scatters ĝ_values to the indices they were read from (indices: no ĝ)."""
    b = n.b
    axis = n.attr("axis", -1)
    grad_values = n.grads[0]
    if grad_values is None:
        return (None, None)
    index = lambda: b.Expand(n.raw_out(1), b.Shape(grad_values)) if n.lead else n.raw_out(1)  # noqa: E731
    return (lambda: b.ScatterElements(n.grad_zeros(0), index(), grad_values, axis=n.grad_axis(axis),
                                      reduction="add"), None)


def max_unpool(n, g):
    """y[indices[j]] = x[j] (flat indices over the whole tensor): ĝ_x = ĝ_y read at the indices."""
    b = n.b
    flat = b.i64([-1])   # (an explicit output_shape only sizes y: the indices are flat indices into it)

    def grad():   # a K axis of ĝ stays: each K slice is flattened and read alone
        rows = b.Reshape(g, b.Concat(n.k_shape, flat, axis=0) if n.lead else flat)
        return b.Reshape(b.Gather(rows, b.Reshape(n.raw(1), flat), axis=n.lead), n.grad_shape(0))
    return (grad, None, None)


def compress(n, g):
    """y = x at the true positions of the condition along `axis` (of the flattened x without it):
    ĝ_x scatters ĝ_y back to those positions."""
    b, axis = n.b, n.attr("axis")

    def grad():
        picked = b.Reshape(b.NonZero(n.raw(1)), b.i64([-1]))
        if axis is None:   # over the flattened x: each K slice of ĝ flattened and scattered alone
            flat = b.i64([-1])
            rows = b.Reshape(g, b.Concat(n.k_shape, flat, axis=0) if n.lead else flat)
            zeros = b.Reshape(n.grad_zeros(0), b.Concat(n.k_shape, flat, axis=0) if n.lead else flat)
            index = b.Expand(picked, b.Shape(rows)) if n.lead else picked
            return b.Reshape(b.ScatterElements(zeros, index, rows, axis=n.lead), n.grad_shape(0))
        r = n.rank(0)
        if r is None:
            refuse(n, "input rank unknown")
        a = axis % r
        index = b.Expand(b.Reshape(picked, b.i64([1] * a + [-1] + [1] * (r - a - 1))), b.Shape(g))
        return b.ScatterElements(n.grad_zeros(0), index, g, axis=n.grad_axis(a))
    return (grad, None)


def tensor_scatter(n, g):
    """y = the cache with `update` written at write_indices[b] + i along `axis` (mod the cache length when
    circular): the cache's ĝ is ĝ_y with the written positions zeroed, the update's ĝ_y read there."""
    b = n.b
    r = n.rank(0)
    if r is None:
        refuse(n, "the rank of the cache must be known")
    axis = n.attr("axis", -2) % r
    if axis == 0:
        refuse(n, "axis 0 is the batch axis")
    cache, update = n.raw(0), n.raw(1)

    def positions():
        """The cache index of every update element along the axis, shaped like ĝ of the update."""
        seq = b.Reshape(b.Gather(b.Shape(update), b.i64([axis])), b.i64([]))
        start = b.Cast(n.raw(2), to=7) if len(n.inputs) > 2 and n.inputs[2] is not None else \
            b.ConstantOfShape(b.Shape(update, end=1), value=ir.tensor([0], dtype=ir.DataType.INT64))
        index = b.Add(b.Unsqueeze(start, b.i64([1])), b.Range(b.i64(0), seq, b.i64(1)))            # [B, seq]
        if n.attr("mode", "linear") == "circular":
            index = b.Mod(index, b.Gather(b.Shape(cache), b.i64([axis])))
        shaped = b.Reshape(index, b.i64([0] + [1] * (axis - 1) + [-1] + [1] * (r - axis - 1)))
        target = b.Shape(update) if not n.lead else b.Concat(n.k_shape, b.Shape(update), axis=0)
        return b.Expand(shaped, target)

    def grad_cache():
        kept = b.TensorScatter(b.ConstantOfShape(b.Shape(cache), value=ir.tensor([1.0], dtype=ir.DataType.FLOAT)),
                               n.zeros_like(b.Shape(update)), *([n.raw(2)] if len(n.inputs) > 2 else []),
                               axis=axis, mode=n.attr("mode", "linear"))
        return b.Mul(g, kept)
    return (grad_cache, lambda: b.GatherElements(g, positions(), axis=n.grad_axis(axis)), None)
