"""VJPs of the DFT and the STFT (docs/design.md, "Relevance semantics"). The DFT is linear; on (real,
imaginary) pairs its adjoint is the conjugate transpose: F^H = L·F⁻¹ for the forward transform, (F⁻¹)^H = F/L
for the inverse, with the one-sided output's missing bins as zeros and a real input reading the real part."""

from __future__ import annotations

import onnx_ir as ir

from lrpc.vjp_common import refuse


def _opset(n) -> int:
    graph = n.node.graph
    return graph.opset_imports.get("", 20) if graph is not None else 20


def _axis(n):
    """(the transform axis as an int64 [1] tensor of the input's axes, its static value or None)."""
    b = n.b
    if _opset(n) < 20:   # DFT-17: the axis is an attribute
        axis = n.attr("axis", 1)
        return b.i64([axis]), axis
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        known = n.const(2)
        if known is not None:
            return b.i64([int(known)]), int(known)
        return b.Reshape(b.Cast(n.raw(2), to=7), b.i64([1])), None
    return b.i64([-2]), -2


def dft(n, g):
    b = n.b
    inverse, onesided = n.attr("inverse", 0), n.attr("onesided", 0)
    axis, static_axis = _axis(n)
    legacy = _opset(n) < 20
    gaxis = n.grad_axes(axis)
    dims = n.raw(0).shape
    if dims is None or not isinstance(dims[-1], int):
        refuse(n, "the last (real/imaginary) dim of the input must be static")

    def transform(v, inverse_flag, one_sided):
        if legacy:
            return b.DFT(v, None, axis=n.grad_axis(static_axis), inverse=inverse_flag, onesided=one_sided)
        return b.DFT(v, None, b.Reshape(gaxis, b.i64([])), inverse=inverse_flag, onesided=one_sided)

    def grad():
        x = n.raw(0)
        given = len(n.inputs) > 1 and n.inputs[1] is not None
        length = b.Reshape(b.Cast(n.raw(1), to=7), b.i64([1])) if given else None
        size = b.Gather(b.Shape(x), axis)                     # the input's length along the axis
        if inverse and onesided:   # y = irfft(X): ĝ_X = c_k/L · rfft(ĝ_y), c = 1 at DC and Nyquist, else 2
            if length is None:
                length = b.Mul(b.Sub(size, b.i64([1])), b.i64([2]))
            spectrum = transform(g, 0, 1)                      # [.., L//2 + 1, 2]
            bins = b.Gather(b.Shape(spectrum), gaxis)
            k = b.Range(b.i64(0), b.Reshape(bins, b.i64([])), b.i64(1))
            edge = b.Add(b.Cast(b.Equal(k, b.i64(0)), to=1), b.Cast(b.Equal(b.Mul(k, b.i64(2)), length), to=1))
            weight = b.Div(b.Sub(b.f32(2.0), edge), b.Cast(length, to=1))
            rank = b.Size(b.Shape(x))
            after = b.Sub(b.Sub(rank, b.i64(1)), b.Reshape(b.Mod(axis, rank), b.i64([])))   # dims after the axis
            ones = b.ConstantOfShape(b.Reshape(after, b.i64([1])), value=ir.tensor([1], dtype=ir.DataType.INT64))
            weight = b.Reshape(weight, b.Concat(bins, ones, axis=0))   # [bins, 1, …]: broadcasts along the axis
            grad = b.Mul(spectrum, weight)
            return _fit(b, grad, size, bins, gaxis)
        if length is None:
            length = size
        full = g
        if onesided:                                           # the bins the one-sided output dropped: zeros
            full = b.Pad(g, b.Concat(b.i64([0]), b.Sub(length, b.Gather(b.Shape(g), gaxis)), axis=0),
                         b.f32(0.0), gaxis)
        back = transform(full, 1 - inverse, 0)
        scale = b.Cast(length, to=1)
        back = b.Mul(back, scale) if not inverse else b.Div(back, scale)
        if given:                                              # x was zero-padded or cut to L
            back = _fit(b, back, size, length, gaxis)
        return b.Slice(back, b.i64([0]), b.i64([1]), b.i64([-1])) if dims[-1] == 1 else back
    return (grad, None, None)


def _fit(b, v, size, length, axes):
    """v cut to, or zero-padded up to, `size` along `axes` (v has `length` there)."""
    cut = b.Slice(v, b.i64([0]), size, axes)
    more = b.Max(b.Sub(size, length), b.i64([0]))
    return b.Pad(cut, b.Concat(b.i64([0]), more, axis=0), b.f32(0.0), axes)


def stft(n, g):
    """y[b, f] = DFT(signal[b, f·step : f·step + W] ⊙ window) (one-sided by default): the DFT's adjoint of
    ĝ_y[b, f] is ĝ of frame f; times the window it overlap-adds back into the signal, times the frames it
    sums into the window."""
    b = n.b
    dims = n.raw(0).shape
    if dims is None or dims.rank() != 3 or not isinstance(dims[-1], int):
        refuse(n, "the signal must be [batch, length, 1 or 2] with a static last dim")
    window = n.inputs[2] if len(n.inputs) > 2 else None
    frame_axis = n.grad_axis(1)

    def width():
        return b.Shape(window) if window is not None else b.Reshape(b.Cast(n.raw(3), to=7), b.i64([1]))

    def adjoint():
        """ĝ of every frame [(K,) B, F·W, c] (before the window), and the signal index of each: f·step + t."""
        bins = n.grad_axis(2)
        full = g
        if n.attr("onesided", 1):      # the bins the one-sided output dropped: zeros
            full = b.Pad(g, b.Concat(b.i64([0]), b.Sub(width(), b.Shape(g, start=bins, end=bins + 1)), axis=0),
                         b.f32(0.0), b.i64([bins]))
        inverse = b.DFT(full, None, axis=bins, inverse=1) if _opset(n) < 20 else \
            b.DFT(full, None, b.i64(bins), inverse=1)
        frames = b.Mul(inverse, b.Cast(width(), to=1))                                    # [(K,) B, F, W, 2]
        if dims[-1] == 1:
            frames = b.Slice(frames, b.i64([0]), b.i64([1]), b.i64([-1]))
        flat = b.Reshape(frames, b.Concat(b.Shape(frames, end=n.lead + 1), b.i64([-1]),
                                          b.Shape(frames, start=-1), axis=0))
        step = b.Reshape(b.Cast(n.raw(1), to=7), b.i64([]))
        count = b.Reshape(b.Gather(b.Shape(g), b.i64(frame_axis)), b.i64([]))
        starts = b.Mul(b.Range(b.i64(0), count, b.i64(1)), step)
        offsets = b.Range(b.i64(0), b.Reshape(width(), b.i64([])), b.i64(1))
        where = b.Reshape(b.Add(b.Unsqueeze(starts, b.i64([1])), offsets), b.i64([1] * (n.lead + 1) + [-1, 1]))
        return flat, b.Expand(where, b.Shape(flat))
    adjoint = n.cached("adjoint", adjoint)

    def grad_signal():
        flat, where = adjoint()
        if window is not None:   # the window along F·W: W repeated per frame
            per_frame = b.Reshape(flat, b.Concat(b.Shape(g, end=frame_axis + 1), b.i64([-1]),
                                                 b.Shape(flat, start=-1), axis=0))
            flat = b.Reshape(b.Mul(per_frame, b.Unsqueeze(n.x(2), b.i64([1]))), b.Shape(flat))
        return b.ScatterElements(n.grad_zeros(0), where, flat, axis=frame_axis, reduction="add")

    def grad_window():
        flat, where = adjoint()
        own = b.Slice(where, b.i64([0] * n.lead), b.i64([1] * n.lead), b.i64(list(range(n.lead)))) if n.lead else where
        read = b.GatherElements(n.x(0), b.Reshape(own, b.Shape(flat, start=n.lead)), axis=1)   # the framed signal
        per_frame = b.Reshape(b.Mul(flat, read), b.Concat(b.Shape(g, end=frame_axis + 1), b.i64([-1]),
                                                          b.Shape(flat, start=-1), axis=0))   # [(K,) B, F, W, c]
        return b.ReduceSum(per_frame, b.i64([frame_axis - 1, frame_axis, -1]), keepdims=0)
    return (grad_signal, None, grad_window if window is not None else None, None)
