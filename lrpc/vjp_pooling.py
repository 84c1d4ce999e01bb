"""VJPs of the pooling ops: global, max, average and Lp pooling (a window's ĝ spread back over the window)."""

from __future__ import annotations

import numpy as np

from lrpc.vjp_common import refuse


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
    """(kernel, strides, pads, dilations) of a pooling node, auto_pad SAME_* written as explicit pads."""
    if n.attr("ceil_mode", 0):
        refuse(n, "ceil_mode=1 is not supported")
    kernel = list(n.attr("kernel_shape"))
    k = len(kernel)
    strides, dilations = list(n.attr("strides") or [1] * k), list(n.attr("dilations") or [1] * k)
    pads, auto_pad = list(n.attr("pads") or [0] * (2 * k)), n.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = n.dims(0)
        if dims is None or not all(isinstance(d, int) for d in dims[2:]):
            refuse(n, f"auto_pad={auto_pad} needs static spatial dims")
        total = [max((-(-d // s) - 1) * s + (kk - 1) * dl + 1 - d, 0)
                 for d, s, kk, dl in zip(dims[2:], strides, kernel, dilations)]
        small = [t // 2 for t in total]   # SAME_UPPER puts the odd one at the end
        pads = (small + [t - h for t, h in zip(total, small)]) if auto_pad == "SAME_UPPER" else \
            ([t - h for t, h in zip(total, small)] + small)
    elif auto_pad not in ("NOTSET", "VALID"):
        refuse(n, f"auto_pad={auto_pad} is not supported")
    return kernel, strides, pads, dilations


def max_pool(n, g):
    """ĝ_x scatter-adds ĝ_y to the argmax of each window (MaxPool's own Indices output, row-major)."""
    b = n.b
    kernel, strides, pads, dilations = _pool_geometry(n)
    if n.attr("storage_order", 0):
        refuse(n, "storage_order=1 is not supported")

    def grad():
        _, indices = b.MaxPool(n.x(0), kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                               _outputs=2)
        flat = b.i64([-1])
        zeros = n.zeros_like(b.Shape(b.Reshape(n.raw(0), flat)))
        scattered = b.ScatterElements(zeros, b.Reshape(indices, flat), b.Reshape(g, flat), axis=0,
                                      reduction="add")
        return b.Reshape(scattered, b.Shape(n.raw(0)))
    return (grad,)


def _pool_transpose_shape(n, kernel, strides, pads, dilations):
    """(channels, output_padding) for the ConvTranspose that spreads a pooling's ĝ back to its input size."""
    dims = n.dims(0)
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
    kernel, strides, pads, dilations = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)
    spatial = n.dims(0)[2:]
    ones = b.f32(np.ones([channels, 1] + kernel, np.float32))
    geometry = dict(strides=strides, pads=pads, dilations=dilations)

    def grad():
        if n.attr("count_include_pad", 0):
            count = b.f32(float(np.prod(kernel)))
        else:  # the elements inside the input under each window: a convolution of ones by ones
            count = b.Conv(b.f32(np.ones([1, 1] + spatial, np.float32)), b.f32(np.ones([1, 1] + kernel, np.float32)),
                           **geometry)
        return b.ConvTranspose(b.Div(g, count), ones, group=channels,
                               output_padding=extra if any(extra) else None, **geometry)
    return (grad,)


def lp_pool(n, g):
    """y = (Σ_window |x|^p)^(1/p): ĝ_x = ConvTranspose(ĝ_y ⊙ y^(1−p), ones) ⊙ sign(x)·|x|^(p−1), with 0 where
    a window's y is 0 (every element 0: no direction increases y faster than another)."""
    b, p = n.b, float(n.attr("p", 2))
    kernel, strides, pads, dilations = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)

    def grad():
        y, x = n.y(), n.x(0)
        safe = b.Where(b.Equal(y, b.f32(0.0)), b.f32(1.0), y)
        scaled = b.Where(b.Equal(y, b.f32(0.0)), b.f32(0.0), b.Mul(g, b.Pow(safe, b.f32(1.0 - p))))
        spread = b.ConvTranspose(scaled, b.f32(np.ones([channels, 1] + kernel, np.float32)), group=channels,
                                 strides=strides, pads=pads, dilations=dilations,
                                 output_padding=extra if any(extra) else None)
        return b.Mul(spread, b.Mul(b.Sign(x), b.Pow(b.Abs(x), b.f32(p - 1.0))))
    return (grad,)
