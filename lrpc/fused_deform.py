"""DeformConv (2-D) written out in standard ops, for the relevance (the node keeps the forward): each kernel
tap samples its input channel bilinearly at its grid position plus a learned offset (zero outside the image,
as GridSample with zeros padding and align_corners does in ONNX's reference), times the optional mask; the
samples are then a grouped convolution, one MatMul. Relevance flows into the input, the weights, the bias,
the mask and the offsets (through the bilinear weights; the corners' Floor carries none)."""

from __future__ import annotations

import numpy as np

from lrpc.fused_common import fail, optional_input
from lrpc.graph import attr


def deform_conv(node, b, ctx):
    x, w, offset, bias, mask = (optional_input(node, i) for i in range(5))
    dims = [b.dim(x, i) for i in range(4)] if b.rank(x) == 4 else None
    out = [b.dim(offset, i) for i in (2, 3)]
    if dims is None or not all(isinstance(d, int) for d in dims[1:] + out) or not isinstance(b.dim(w, 0), int):
        raise fail(node, "an input that is not 2-D with static channels, sizes and output size")
    _, channels, height, width = dims
    out_channels, (out_h, out_w) = b.dim(w, 0), out
    kernel = list(attr(node, "kernel_shape") or [b.dim(w, 2), b.dim(w, 3)])
    stride, dilation = list(attr(node, "strides") or [1, 1]), list(attr(node, "dilations") or [1, 1])
    pads = list(attr(node, "pads") or [0, 0, 0, 0])
    groups, offset_groups = int(attr(node, "group", 1)), int(attr(node, "offset_group", 1))
    taps, positions = kernel[0] * kernel[1], out_h * out_w
    # each tap's grid position before its offset: [taps, positions], row then column
    i, j, oh, ow = np.meshgrid(np.arange(kernel[0]), np.arange(kernel[1]), np.arange(out_h), np.arange(out_w),
                               indexing="ij")
    grid = [(o * s - p + k * d).reshape(taps, positions).astype(np.float32)
            for o, s, p, k, d in ((oh, stride[0], pads[0], i, dilation[0]), (ow, stride[1], pads[1], j, dilation[1]))]
    moved = b.Reshape(offset, b.i64([0, offset_groups, taps, 2, positions]))
    at_y, at_x = (b.Add(b.const(g), b.Squeeze(b.Slice(moved, b.i64([c]), b.i64([c + 1]), b.i64([3])), b.i64([3])))
                  for c, g in enumerate(grid))                                          # [N, G, taps, positions]
    y0, x0 = b.Floor(at_y), b.Floor(at_x)
    fy, fx = b.Sub(at_y, y0), b.Sub(at_x, x0)
    pixels = b.Reshape(x, b.i64([0, offset_groups, channels // offset_groups, height * width]))
    samples = None
    for dy, wy in ((0.0, b.Sub(b.scalar(1.0), fy)), (1.0, fy)):
        for dx, wx in ((0.0, b.Sub(b.scalar(1.0), fx)), (1.0, fx)):
            cy, cx = b.Add(y0, b.scalar(dy)), b.Add(x0, b.scalar(dx))
            inside = b.And(_within(b, cy, height), _within(b, cx, width))
            weight = b.Where(inside, b.Mul(wy, wx), b.scalar(0.0))
            flat = b.Add(b.Mul(b.Clip(cy, b.scalar(0.0), b.scalar(height - 1.0)), b.scalar(float(width))),
                         b.Clip(cx, b.scalar(0.0), b.scalar(width - 1.0)))
            index = b.Reshape(b.Cast(flat, to=7), b.i64([0, offset_groups, 1, taps * positions]))
            index = b.Expand(index, b.Concat(b.Shape(pixels, end=3), b.i64([taps * positions]), axis=0))
            term = b.Mul(b.GatherElements(pixels, index, axis=3),
                         b.Reshape(weight, b.i64([0, offset_groups, 1, taps * positions])))
            samples = term if samples is None else b.Add(samples, term)
    if mask is not None:
        samples = b.Mul(samples, b.Reshape(mask, b.i64([0, offset_groups, 1, taps * positions])))
    columns = b.Reshape(samples, b.i64([0, groups, channels // groups * taps, positions]))
    weights = b.Reshape(w, b.i64([groups, out_channels // groups, channels // groups * taps]))
    y = b.Reshape(b.MatMul(weights, columns), b.i64([0, out_channels, out_h, out_w]))
    return [y if bias is None else b.Add(y, b.Reshape(bias, b.i64([1, out_channels, 1, 1])))]


def _within(b, coordinate, size: int):
    return b.And(b.GreaterOrEqual(coordinate, b.scalar(0.0)), b.LessOrEqual(coordinate, b.scalar(size - 1.0)))

