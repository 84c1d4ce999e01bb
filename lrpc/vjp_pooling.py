"""VJPs of the pooling ops: global, max, average and Lp pooling (a window's ĝ spread back over the window)."""

from __future__ import annotations

import numpy as np

from lrpc.vjp_common import forward_dims, refuse
from lrpc.vjp_conv import explicit_pads, fold_k


def global_average_pool(n, g):
    b = n.b
    count = lambda: b.Div(b.Cast(b.Size(n.raw_out(0)), to=1), b.Cast(b.Size(n.raw(0)), to=1))  # noqa: E731
    return (lambda: b.Mul(b.Expand(g, b.Shape(n.raw(0))), count()),)


def global_max_pool(n, g):
    """ĝ goes to the maximum of each channel, split evenly between ties."""
    b = n.b

    def grad():
        x = n.x(0)
        mask = b.Cast(b.Equal(x, n.y()), to=1)
        spatial = b.Range(b.i64(2), b.Cast(b.Size(b.Shape(n.raw(0))), to=7), b.i64(1))
        return b.Mul(b.Expand(g, b.Shape(n.raw(0))), b.Div(mask, b.ReduceSum(mask, spatial, keepdims=1)))
    return (grad,)


def _pool_geometry(n):
    """(kernel, strides, pads, dilations, ceil_extra) of a pooling node, auto_pad SAME_* written as explicit
    pads; ceil_mode=1 as floor mode with `ceil_extra` more padding at the end (windows that only the ceiling
    lets in average over the elements they cover)."""
    kernel = list(n.attr("kernel_shape"))
    k = len(kernel)
    strides, dilations = list(n.attr("strides") or [1] * k), list(n.attr("dilations") or [1] * k)
    pads = explicit_pads(n, kernel, strides, dilations)
    extra = [0] * k
    if n.attr("ceil_mode", 0):
        dims, out = forward_dims(n), n.raw_out(0).shape
        if dims is None or out is None or not all(isinstance(d, int) for d in dims[2:] + list(out)[2:]):
            refuse(n, "ceil_mode=1 needs static spatial dims")
        extra = [max(0, (o - 1) * s + dl * (kk - 1) + 1 - d - pb - pe)
                 for d, o, s, kk, dl, pb, pe in zip(dims[2:], list(out)[2:], strides, kernel, dilations, pads[:k],
                                                     pads[k:])]
        pads = pads[:k] + [pe + e for pe, e in zip(pads[k:], extra)]
    return kernel, strides, pads, dilations, extra


def max_pool(n, g):
    """ĝ_x scatter-adds ĝ_y to the argmax of each window (MaxPool's own Indices output, row-major)."""
    b = n.b
    kernel, strides, pads, dilations, _ = _pool_geometry(n)   # (storage_order only orders the Indices output)

    def grad():
        _, indices = b.MaxPool(n.x(0), kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                               _outputs=2)
        flat = b.i64([-1])   # each K slice of ĝ flattened and scattered alone
        rows = b.Reshape(g, b.Concat(n.k_shape, flat, axis=0) if n.lead else flat)
        zeros = b.Reshape(n.grad_zeros(0), b.Concat(n.k_shape, flat, axis=0) if n.lead else flat)
        scattered = b.ScatterElements(zeros, b.Expand(b.Reshape(indices, flat), b.Shape(rows)), rows, axis=n.lead,
                                      reduction="add")
        return b.Reshape(scattered, n.grad_shape(0))
    return (grad,)


def _pool_transpose_shape(n, kernel, strides, pads, dilations):
    """(channels, output_padding) for the ConvTranspose that spreads a pooling's ĝ back to its input size."""
    dims = forward_dims(n)
    if dims is None or not all(isinstance(d, int) for d in dims[1:]):
        refuse(n, "channels and spatial dims must be static")
    k = len(kernel)
    out_dims = [(d + pads[i] + pads[i + k] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                for i, d in enumerate(dims[2:])]
    full = [(o - 1) * strides[i] - pads[i] - pads[i + k] + dilations[i] * (kernel[i] - 1) + 1
            for i, o in enumerate(out_dims)]
    return dims[1], [s - f for s, f in zip(dims[2:], full)]


def average_pool(n, g):
    """ĝ_x = ConvTranspose(ĝ_y / count, ones) per channel, count the elements each window averaged."""
    b = n.b
    kernel, strides, pads, dilations, ceil_extra = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)
    spatial, k = forward_dims(n)[2:], len(kernel)
    ones = b.f32(np.ones([channels, 1] + kernel, np.float32))
    geometry = dict(strides=strides, pads=pads, dilations=dilations)

    def grad():
        if n.attr("count_include_pad", 0) and not any(ceil_extra):
            count = b.f32(float(np.prod(kernel)))
        elif n.attr("count_include_pad", 0):   # the padded input under each window, not what ceil_mode adds
            padded = [d + pb + pe for d, pb, pe in zip(spatial, pads[:k], [pe - e for pe, e in zip(pads[k:], ceil_extra)])]
            count = b.Conv(b.f32(np.ones([1, 1] + padded, np.float32)), b.f32(np.ones([1, 1] + kernel, np.float32)),
                           strides=strides, dilations=dilations, pads=[0] * k + ceil_extra)
        else:  # the elements inside the input under each window: a convolution of ones by ones
            count = b.Conv(b.f32(np.ones([1, 1] + spatial, np.float32)), b.f32(np.ones([1, 1] + kernel, np.float32)),
                           **geometry)
        return fold_k(n, b.Div(g, count), lambda v: b.ConvTranspose(v, ones, group=channels,
                                                                     output_padding=extra if any(extra) else None,
                                                                     **geometry))
    return (grad,)


def lp_pool(n, g):
    """y = (Σ_window |x|^p)^(1/p): ĝ_x = ConvTranspose(ĝ_y ⊙ y^(1−p), ones) ⊙ sign(x)·|x|^(p−1), with 0 where
    a window's y is 0 (every element 0: no direction increases y faster than another)."""
    b, p = n.b, float(n.attr("p", 2))
    kernel, strides, pads, dilations, _ = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)

    def grad():
        spread = fold_k(n, _lp_outer(n, g, p), lambda v: b.ConvTranspose(
            v, b.f32(np.ones([channels, 1] + kernel, np.float32)), group=channels, strides=strides, pads=pads,
            dilations=dilations, output_padding=extra if any(extra) else None))
        return _lp_inner(n, spread, p)
    return (grad,)


def global_lp_pool(n, g):
    """y = (Σ_spatial |x|^p)^(1/p) per channel: lp_pool with one window over all of the spatial dims."""
    p = float(n.attr("p", 2))
    return (lambda: _lp_inner(n, n.b.Expand(_lp_outer(n, g, p), n.b.Shape(n.raw(0))), p),)


def _lp_outer(n, g, p):
    """ĝ_y ⊙ y^(1−p), 0 where y = 0 (no division by a zero norm)."""
    b, y = n.b, n.y()
    zero = b.Equal(y, b.f32(0.0))
    return b.Where(zero, b.f32(0.0), b.Mul(g, b.Pow(b.Where(zero, b.f32(1.0), y), b.f32(1.0 - p))))


def _lp_inner(n, spread, p):
    """ĝ_y ⊙ y^(1−p) spread over each window, times ∂|x|^p/∂x / p = sign(x)·|x|^(p−1)."""
    b, x = n.b, n.x(0)
    return b.Mul(spread, b.Mul(b.Sign(x), b.Pow(b.Abs(x), b.f32(p - 1.0))))
