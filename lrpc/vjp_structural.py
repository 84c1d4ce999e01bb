"""VJPs of the structural ops: reshapes, transposes, concatenation, slicing, gathers, Where, Trilu."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.vjp_common import forward_dims, refuse
from lrpc.vjp_scatter import k_indices


def concat(n, g):
    b, axis = n.b, n.attr("axis")
    end = axis + 1 if axis + 1 != 0 else None
    sizes = b.Concat(*[b.Shape(i, start=axis, end=end) for i in n.inputs], axis=0)
    pieces = n.cached("split", lambda: b.Split(g, sizes, axis=n.grad_axis(axis), _outputs=len(n.inputs)))
    one = lambda i: (pieces() if len(n.inputs) > 1 else (pieces(),))[i]
    return tuple((lambda i=i: one(i)) for i in range(len(n.inputs)))


def split(n, g):
    b = n.b
    parts = [gi if gi is not None else n.zeros_like_out(i) for i, gi in enumerate(n.grads)]
    return (lambda: b.Concat(*parts, axis=n.grad_axis(n.attr("axis", 0))),)


def slice_(n, g):
    """y = x[starts:ends:steps] along `axes`. Unit steps: ĝ_x is ĝ_y zero-padded (s before, d − e after);
    other steps: ĝ_y is scattered back, axis by axis, to the indices the slice read."""
    b = n.b
    x, r = n.raw(0), n.rank(0)
    starts, ends = b.Cast(n.raw(1), to=7), b.Cast(n.raw(2), to=7)
    has = lambda i: len(n.inputs) > i and n.inputs[i] is not None  # noqa: E731
    count = len(n.const(1)) if n.const(1) is not None else None
    axes_const = n.const(3) if has(3) else (np.arange(count) if count is not None else None)
    if axes_const is None and not has(3):   # run-time starts without axes
        return (lambda: _slice_by_ramp(n, g),)
    axes = b.Cast(n.raw(3), to=7) if has(3) else b.i64(list(axes_const))
    steps = n.const(4) if has(4) else np.ones(1, np.int64)
    if steps is None or np.any(steps != 1):
        if r is None or axes_const is None:
            return (lambda: _slice_by_ramp(n, g),)
        return (lambda: _slice_scatter(n, g, starts, ends, [int(a) % r for a in axes_const]),)

    static = _static_slice_pads(n, axes_const)
    if static is not None:
        def padded():
            lead = [0] * n.lead  # ĝ's K axis is not padded
            grad = b.Pad(g, b.i64(lead + static[:len(static) // 2] + lead + static[len(static) // 2:])
                         if n.lead else b.i64(static), mode="constant")
            grad.type, grad.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(n.dims(0))  # for pads_to_concat
            return grad
        return (padded,)

    def pad():
        dims = b.Gather(b.Shape(x), axes)
        zero = b.i64([0])
        s = _clamp_index(b, starts, dims, zero)
        after = b.Sub(dims, b.Max(_clamp_index(b, ends, dims, zero), s))
        if r is None or axes_const is None:
            return b.Pad(g, b.Concat(s, after, axis=0), None, n.grad_axes(axes), mode="constant")
        # full-rank pads without the `axes` input (onnxruntime's transpose optimizer mishandles that form)
        where = {int(a) % r: i for i, a in enumerate(axes_const)}
        pick = lambda v, d: b.Slice(v, b.i64([where[d]]), b.i64([where[d] + 1])) if d in where else zero  # noqa
        lead = [zero] * n.lead  # ĝ's K axis is not padded
        return b.Pad(g, b.Concat(*lead, *[pick(s, d) for d in range(r)], *lead, *[pick(after, d) for d in range(r)],
                                 axis=0), mode="constant")
    return (pad,)


def _static_slice_pads(n, axes_const) -> list[int] | None:
    """Full-rank Pad amounts of a unit-step Slice's VJP, when starts, ends, axes and the sliced dims are
    all known at compile time (ONNX Slice clamping: negative indices count from the end)."""
    x, r = n.raw(0), n.rank(0)
    starts, ends = n.const(1), n.const(2)
    if r is None or axes_const is None or starts is None or ends is None or x.shape is None:
        return None
    before, after = [0] * r, [0] * r
    for start, end, axis in zip(starts.tolist(), ends.tolist(), axes_const.tolist()):
        axis = int(axis) % r
        dim = x.shape[axis]
        if not isinstance(dim, int):
            return None
        start, end = (min(max(i + dim if i < 0 else i, 0), dim) for i in (start, end))
        before[axis], after[axis] = start, dim - max(end, start)
    return before + after


def _clamp_index(b, index, dims, zero):
    index = b.Min(index, dims)  # INT64_MAX style "to the end" sentinels
    index = b.Where(b.Less(index, zero), b.Add(index, dims), index)
    return b.Max(b.Min(index, dims), zero)


def _slice_scatter(n, g, starts, ends, axes: list[int]):
    """Strided slices: the indices read along each axis are the same Slice applied to Range(0, d)."""
    b, r = n.b, n.rank(0) + n.lead   # the rank of ĝ
    steps = b.Cast(n.raw(4), to=7)
    grad = g
    for i, forward_axis in enumerate(axes):
        axis = n.grad_axis(forward_axis)
        one = lambda v: b.Slice(v, b.i64([i]), b.i64([i + 1]))  # noqa: E731
        dim = b.Shape(n.raw(0), start=forward_axis, end=forward_axis + 1)
        read = b.Slice(b.Range(b.i64(0), b.Squeeze(dim, b.i64([0])), b.i64(1)), one(starts), one(ends), b.i64([0]),
                       one(steps))
        index = b.Expand(b.Reshape(read, b.i64([1] * axis + [-1] + [1] * (r - axis - 1))), b.Shape(grad))
        target = b.Concat(*([b.Shape(grad, end=axis)] if axis > 0 else []), dim,
                          *([b.Shape(grad, start=axis + 1)] if axis + 1 < r else []), axis=0)
        grad = b.ScatterElements(n.zeros_like(target), index, grad, axis=axis)
    return grad


def _slice_by_ramp(n, g):
    """Any slice (run-time axes and steps too): the flat indices it reads are the same Slice of a ramp over x;
    ĝ_x scatters ĝ_y back to them (with a K axis, each of its K rows alike)."""
    b, x = n.b, n.raw(0)
    size = b.Size(x)
    read = b.Slice(b.Reshape(b.Range(b.i64(0), size, b.i64(1)), b.Shape(x)), *n.inputs[1:])
    flat = b.Reshape(g, b.Concat(n.k_shape, b.i64([-1]), axis=0) if n.lead else b.i64([1, -1]))
    index = b.Expand(b.Reshape(read, b.i64([1, -1])), b.Shape(flat))
    zeros = n.zeros_like(b.Concat(b.Shape(flat, end=1), b.Reshape(size, b.i64([1])), axis=0))
    return b.Reshape(b.ScatterElements(zeros, index, flat, axis=1), n.grad_shape(0))


def gather(n, g):
    """y = take(x, idx, axis): ĝ_x scatter-adds ĝ_y back to the positions read (indices may repeat)."""
    b = n.b
    axis, r = n.attr("axis", 0), n.rank(0)
    axis = axis % r if r is not None else axis
    flat = lambda: b.Reshape(b.Cast(n.raw(1), to=7), b.i64([-1]))

    def rows(flat_idx):  # ĝ_y with the index axes flattened into one: [*x.shape[:axis], n, *x.shape[axis+1:]]
        pieces = ([n.k_shape] if n.lead else []) + ([b.Shape(n.raw(0), end=axis)] if axis > 0 else []) + \
                 [b.Shape(flat_idx)] + [b.Shape(n.raw(0), start=axis + 1)]
        return b.Reshape(g, b.Concat(*pieces, axis=0))

    def scatter_rows():  # axis 0 needs no rank: ScatterND adds whole slices x[idx_k] += ĝ_k (per K slice)
        idx = flat()
        tuples = b.Unsqueeze(idx, b.i64([-1]))
        return b.ScatterND(n.grad_zeros(0), k_indices(n, tuples) if n.lead else tuples, rows(idx), reduction="add")

    def scatter_elements():
        if r is None:
            raise LrpcError(f"node '{n.node.name}' (Gather): data rank unknown; re-export with static ranks")
        idx = flat()
        g_r = rows(idx)
        at = n.grad_axis(axis)
        index = b.Expand(b.Reshape(idx, b.i64([1] * at + [-1] + [1] * (r - axis - 1))), b.Shape(g_r))
        return b.ScatterElements(n.grad_zeros(0), index, g_r, axis=at, reduction="add")
    return (scatter_rows if axis == 0 else scatter_elements, None)


def unique(n, g):
    """Unique's Y selects x's distinct values (or slices along `axis`): ĝ_x = ĝ_Y read back at each element's
    inverse index, split evenly among equal ones (counts), as a tie splits ĝ elsewhere. The inverse indices and
    counts are the node's own outputs, or a second Unique's when the node leaves them out."""
    b = n.b
    axis = n.attr("axis")
    outputs = list(n.node.outputs) + [None] * (4 - len(n.node.outputs))

    def grad():
        if outputs[2] is None or not outputs[2].name or outputs[3] is None or not outputs[3].name:
            settings = {k: n.attr(k) for k in ("axis", "sorted") if n.attr(k) is not None}
            outputs[2:] = b.Unique(n.raw(0), _outputs=4, **settings)[2:]
        at = -1 if axis is None else n.grad_axis(axis % n.rank(0))
        counts = b.Cast(outputs[3], to=1)
        if axis is not None:   # [U] along the axis of a ĝ_Y [(K,) …, U, …]
            counts = b.Reshape(counts, b.i64([-1] + [1] * (n.rank(0) - 1 - axis % n.rank(0))))
        shared = b.Gather(b.Div(g, counts), outputs[2], axis=at)
        return shared if axis is not None else b.Reshape(shared, n.grad_shape(0))
    return (grad,)


def gather_elements(n, g):
    b = n.b
    index = lambda: b.Expand(n.raw(1), b.Shape(g)) if n.lead else n.raw(1)  # noqa: E731  (one per K slice)
    return (lambda: b.ScatterElements(n.grad_zeros(0), index(), g, axis=n.grad_axis(n.attr("axis", 0)),
                                      reduction="add"), None)


def gather_nd(n, g):
    """GatherND: ĝ_data scatter-adds ĝ_y back to the slices read (batch_dims = 0)."""
    b = n.b
    if n.attr("batch_dims", 0) != 0:
        raise LrpcError(f"node '{n.node.name}' (GatherND): batch_dims ≠ 0 on a relevance-carrying tensor is not "
                        "supported")
    index = (lambda: k_indices(n, n.raw(1))) if n.lead else (lambda: b.Cast(n.raw(1), to=7))   # per K slice
    return (lambda: b.ScatterND(n.grad_zeros(0), index(), g, reduction="add"), None)


def where(n, g):
    b, zero = n.b, n.b.f32(0.0)
    return (None, lambda: b.Where(n.raw(0), g, zero), lambda: b.Where(n.raw(0), zero, g))


def tile(n, g):
    """ĝ_x sums ĝ_y over the copies: ĝ_y reshaped to [r₀, d₀, r₁, d₁, …], summed over the r axes."""
    b, r = n.b, n.rank(0)
    if r is None:
        refuse(n, "input rank unknown")
    if r == 0:
        return (lambda: g, None)

    def grad():
        column = b.i64([-1, 1])
        pairs = b.Reshape(b.Concat(b.Reshape(b.Cast(n.raw(1), to=7), column), b.Reshape(b.Shape(n.raw(0)), column),
                                   axis=1), b.i64([-1]))
        if n.lead:   # the K axis stays in front of the pairs
            pairs = b.Concat(n.k_shape, pairs, axis=0)
        return b.ReduceSum(b.Reshape(g, pairs), b.i64(list(range(n.lead, n.lead + 2 * r, 2))), keepdims=0)
    return (grad, None)


def _unpermute(n, g, dims, inner, perm):
    """ĝ of x → Reshape(inner) → Transpose(perm) → Reshape: the steps undone on ĝ_y, in reverse (a K axis
    of ĝ stays in front, its size read at run time)."""
    permuted, lead = [inner[p] for p in perm], [-1] * n.lead
    back = n.grad_perm([int(p) for p in np.argsort(perm)])
    return (lambda: n.b.Reshape(n.b.Transpose(n.b.Reshape(g, n.b.i64(lead + permuted)), perm=back),
                                n.b.i64(lead + dims)),)


def _static_dims(n):
    """The input's forward dims (without ĝ's K axis), known at compile time."""
    dims = forward_dims(n)
    if dims is None or not all(isinstance(d, int) for d in dims):
        refuse(n, "the input's dims must be known at compile time")
    return dims


def depth_to_space(n, g):
    """DCR: [N, C, H, W] → [N, bs, bs, C/bs², H, W] → (0, 3, 4, 1, 5, 2); CRD: [N, C/bs², bs, bs, H, W] →
    (0, 1, 4, 2, 5, 3); ĝ undoes the permutation and the reshapes."""
    bs, dims = n.attr("blocksize"), _static_dims(n)
    batch, c, h, w = dims
    if n.attr("mode", "DCR") == "DCR":
        inner, perm = [batch, bs, bs, c // (bs * bs), h, w], [0, 3, 4, 1, 5, 2]
    else:
        inner, perm = [batch, c // (bs * bs), bs, bs, h, w], [0, 1, 4, 2, 5, 3]
    return _unpermute(n, g, dims, inner, perm)


def space_to_depth(n, g):
    """[N, C, H, W] → [N, C, H/bs, bs, W/bs, bs] → DCR (0, 3, 5, 1, 2, 4) or CRD (0, 1, 3, 5, 2, 4) →
    [N, C·bs², H/bs, W/bs]; ĝ undoes the permutation and the reshapes."""
    bs, dims = n.attr("blocksize"), _static_dims(n)
    batch, c, h, w = dims
    inner = [batch, c, h // bs, bs, w // bs, bs]
    perm = [0, 3, 5, 1, 2, 4] if n.attr("mode", "DCR") == "DCR" else [0, 1, 3, 5, 2, 4]
    return _unpermute(n, g, dims, inner, perm)


def pad(n, g):
    """Constant Pad: ĝ_x is ĝ_y padded by the negated amounts (a crop; a negative pad, a crop, comes back as
    zeros); the padding value receives everything ĝ_y has outside x."""
    b, mode = n.b, n.attr("mode", "constant")
    if mode != "constant":
        refuse(n, f"mode={mode} is not supported")
    axes = n.raw(3) if len(n.inputs) > 3 and n.inputs[3] is not None else None
    if n.lead:   # ĝ's K axis is not padded: name the padded axes, all of x's when the node names none
        if axes is None and n.rank(0) is None:
            refuse(n, "input rank unknown (needed with --targets)")
        axes = n.grad_axes(b.Cast(axes, to=7)) if axes is not None else b.i64(list(range(1, n.rank(0) + 1)))
    grad_x = n.cached("x", lambda: b.Pad(g, b.Neg(b.Cast(n.raw(1), to=7)), None, axes, mode="constant"))
    # per K slice: everything ĝ_y has outside x
    total = (lambda v: b.ReduceSum(b.Reshape(v, b.Concat(n.k_shape, b.i64([-1]), axis=0)), b.i64([1]), keepdims=0)) \
        if n.lead else (lambda v: b.ReduceSum(v, keepdims=0))
    return (grad_x, None, lambda: b.Sub(total(g), total(grad_x())), None)


def reverse_sequence(n, g):
    """Self-transposing: the same reversal maps ĝ_y back. onnxruntime takes only axes 0 and 1, so a K axis
    of ĝ is moved behind x's axes for it."""
    b, axes = n.b, dict(batch_axis=n.attr("batch_axis", 1), time_axis=n.attr("time_axis", 0))
    if not n.lead:
        return (lambda: b.ReverseSequence(g, n.raw(1), **axes), None)
    r = n.rank(0)
    if r is None:
        refuse(n, "input rank unknown (needed with --targets)")
    behind = list(range(1, r + 1)) + [0]
    return (lambda: b.Transpose(b.ReverseSequence(b.Transpose(g, perm=behind), n.raw(1), **axes),
                                perm=[r] + list(range(r))), None)


def center_crop_pad(n, g):
    """Self-transposing: cropping/padding ĝ_y back to x's dims (the centre offsets of a crop and its pad
    coincide)."""
    def grad():
        axes, shape = n.attr("axes"), n.b.Shape(n.raw(0))
        dims = shape if axes is None else n.b.Gather(shape, n.b.i64(list(axes)))
        if axes is None and n.lead:   # all of x's axes, behind ĝ's K axis
            if n.rank(0) is None:
                refuse(n, "input rank unknown (needed with --targets)")
            axes = range(n.rank(0))
        return n.b.CenterCropPad(g, dims, axes=None if axes is None else [n.grad_axis(a) for a in axes])
    return (grad, None)


def array_feature_extractor(n, g):
    """y = x[..., indices] (ai.onnx.ml; a 1-D x gives [1, k]): ĝ_x scatter-adds ĝ_y back along the last axis
    (indices may repeat)."""
    b = n.b

    def grad():
        pieces = ([n.k_shape] if n.lead else []) + [b.Shape(n.raw(0), end=-1), b.i64([-1])]
        rows = b.Reshape(g, b.Concat(*pieces, axis=0))
        index = b.Expand(b.Reshape(b.Cast(n.raw(1), to=7), b.i64([-1])), b.Shape(rows))
        return b.ScatterElements(n.grad_zeros(0), index, rows, axis=-1, reduction="add")
    return (grad, None)
