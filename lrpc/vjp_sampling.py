"""VJPs of the resampling ops: Resize (Upsample becomes Resize), GridSample, AffineGrid, RoiAlign (docs/design.md,
"Relevance semantics"). For fixed coordinates each is linear in its data input (RoiAlign's max mode piecewise linear),
and its VJP is the transposed map."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from lrpc.vjp_common import along_axis, refuse

F32 = ir.DataType.FLOAT
CUBIC_A = -0.75   # the cubic convolution constant: GridSample's (fixed by the spec), Resize's default cubic_coeff_a
RESIZE_ATTRS = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "nearest_mode",
                "antialias")


def _given(n, i: int) -> bool:
    """Whether optional input i is given (an empty constant counts as absent)."""
    if len(n.inputs) <= i or n.inputs[i] is None:
        return False
    known = n.const(i)
    return known is None or known.size > 0


def _identity_axis(n, j: int, a: int, use_scales: bool, cropping: bool) -> bool:
    """Whether resizing axis a (the j-th resized axis) is known to be the identity (scale 1, no crop)."""
    if cropping:
        return False
    factors = n.const(2 if use_scales else 3)
    dims = n.dims(0)
    if factors is None:
        return False
    if use_scales:
        return float(factors[j]) == 1.0
    return dims is not None and isinstance(dims[n.lead + a], int) and int(factors[j]) == dims[n.lead + a]


def resize(n, g):
    """Resize is separable: along each resized axis a it is a fixed matrix M_a [out_a, in_a] (nearest,
    linear, cubic, antialias and every coordinate transform alike). M_aᵀ is read off the op itself, as
    Resize of the identity [in_a, in_a] along its last axis with the node's own settings (extrapolation 0);
    ĝ_x applies each M_aᵀ to ĝ_y along its axis. The roi's ĝ: `resize_roi`."""
    b = n.b
    if len(n.inputs) > 2 and n.carries(2):
        refuse(n, "relevance into the scales (the sampling coordinates) is not supported")
    use_scales = _given(n, 2)
    r = n.rank(0)
    if r is None:
        refuse(n, "the rank of the input must be known")
    axes = [a % r for a in (n.attr("axes") or range(r))]
    k = len(axes)
    # the policy scales every resized axis by one factor (one axis: its own, as with stretch)
    policy = "stretch" if use_scales or k == 1 else n.attr("keep_aspect_ratio_policy", "stretch")
    cropping = n.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    if policy != "stretch":
        dims = n.raw(0).shape
        extents = [dims[a] for a in axes] if dims is not None else [None]
        if cropping or not all(isinstance(d, int) for d in extents):
            refuse(n, f"keep_aspect_ratio_policy={policy} needs static resized dims and no crop")
        if max(extents) * int(np.prod(extents)) > PROBE_LIMIT:
            refuse(n, f"keep_aspect_ratio_policy={policy}: its probe of the scale is too large for the exact "
                      "transposed map")
    settings = {k: n.attr(k) for k in RESIZE_ATTRS if n.attr(k) is not None}

    def probe(j: int, a: int):
        """M_aᵀ [in_a, out_a]."""
        size = b.Shape(n.raw(0), start=a, end=a + 1)
        eye = b.EyeLike(b.ConstantOfShape(b.Concat(size, size, axis=0), value=ir.tensor([0.0], dtype=F32)))
        pick = lambda i, offset=0: b.Slice(n.raw(i), b.i64([j + offset]), b.i64([j + offset + 1]))  # noqa: E731
        roi = b.Concat(b.f32([0.0]), b.Cast(pick(1), to=1), b.f32([1.0]), b.Cast(pick(1, len(axes)), to=1),
                       axis=0) if cropping else None
        scales = b.Concat(b.f32([1.0]), b.Cast(pick(2), to=1), axis=0) if use_scales else None
        sizes = None if use_scales else b.Concat(size, b.Cast(pick(3), to=7), axis=0)
        return b.Resize(eye, roi, scales, sizes, extrapolation_value=0.0, **settings)

    def probe_all(j: int, a: int):
        """M_aᵀ [in_a, out_a] when the sizes are kept to one aspect ratio: the scale then depends on every resized
        axis, so the identity along a is resized together with constant (ones) extents of the others, with the
        node's own sizes and policy, and read at index 0 of the others."""
        size = b.Shape(n.raw(0), start=a, end=a + 1)
        extents = b.Gather(b.Shape(n.raw(0)), b.i64(axes))
        eye = b.EyeLike(b.ConstantOfShape(b.Concat(size, size, axis=0), value=ir.tensor([0.0], dtype=F32)))
        ones = lambda m: [b.i64([1] * m)] if m else []  # noqa: E731
        # [1, in_a, extents] resized along its last k axes: a 4-D probe for an image, as onnxruntime's cubic needs
        placed = b.Reshape(eye, b.Concat(b.i64([1]), size, *ones(j), size, *ones(k - j - 1), axis=0))
        sampled = b.Resize(b.Expand(placed, b.Concat(b.i64([1]), size, extents, axis=0)), None, None,
                           b.Cast(n.raw(3), to=7), axes=list(range(2, k + 2)), keep_aspect_ratio_policy=policy,
                           **settings)
        others = [i + 2 for i in range(k) if i != j]
        first = b.Slice(sampled, b.i64([0] * len(others)), b.i64([1] * len(others)), b.i64(others))
        return b.Reshape(first, b.Concat(size, b.i64([-1]), axis=0))

    def back(grad, skip=None):
        """ĝ_y with M_aᵀ applied along every resized axis a but `skip`."""
        for j, a in enumerate(axes):
            if j == skip or policy == "stretch" and _identity_axis(n, j, a, use_scales, cropping):
                continue
            matrix = probe(j, a) if policy == "stretch" else probe_all(j, a)
            grad = along_axis(b, grad, n.grad_axis(a), r + n.lead, b.Transpose(matrix, perm=[1, 0]))
        return grad

    grads = [lambda: back(g)] + [None] * (len(n.inputs) - 1)
    if len(n.inputs) > 1 and n.carries(1):
        grads[1] = lambda: resize_roi(n, g, axes, back)
    return tuple(grads)


def resize_roi(n, g, axes, back):
    """ĝ of tf_crop_and_resize's roi, linear and cubic modes (nearest: 0). Along axis a the output o reads
    x_a(o) = start·(in − 1) + o·(end − start)·(in − 1)/(out − 1) (out = 1: the middle) as Σ_i w_i(t)·X[x₀ + i],
    x₀ = ⌊x_a⌋, t = x_a − x₀, the pixel indices clamped to [0, in − 1] (linear: i = 0, 1; cubic: −1 … 2, the node's
    cubic_coeff_a, with exclude_outside the weights of pixels outside the image dropped and the rest renormalised),
    and the extrapolation value outside [0, in − 1], as the spec and onnxruntime do: ∂y/∂x_a = Σ_i w_i′(t)·X[x₀ + i]
    inside (the matrix D_a, applied along a, the other axes resized as the node does). ĝ_start =
    Σ_o c(o)·(in − 1)(1 − o/(out − 1)), ĝ_end = Σ_o c(o)·(in − 1)·o/(out − 1), c(o) = Σ over the other axes of
    (ĝ_y resized back along them) ⊙ (D_a x)."""
    b, r, lead = n.b, n.rank(0), n.lead
    mode = n.attr("mode", "nearest")
    if n.attr("coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize" or mode == "nearest":
        return n.grad_zeros(1)   # the roi unread, or piecewise constant
    if n.attr("antialias", 0):
        refuse(n, f"relevance into roi with mode={mode} and antialias is not supported")
    a, exclude = float(n.attr("cubic_coeff_a", CUBIC_A)), n.attr("exclude_outside", 0) and mode == "cubic"
    k, roi = len(axes), n.x(1)
    starts, ends = [], []
    for j, a_axis in enumerate(axes):
        size = b.Cast(b.Shape(n.raw(0), start=a_axis, end=a_axis + 1), to=1)                     # [1] in_a
        out = b.Cast(b.Shape(n.raw_out(0), start=a_axis, end=a_axis + 1), to=1)                 # [1] out_a
        span = b.Sub(size, b.f32(1.0))
        start, end = b.Slice(roi, b.i64([j]), b.i64([j + 1])), b.Slice(roi, b.i64([j + k]), b.i64([j + k + 1]))
        steps = b.Range(b.f32(0.0), b.Reshape(out, b.i64([])), b.f32(1.0))                          # [out_a] o
        many = b.Greater(out, b.f32(1.0))
        fraction = b.Where(many, b.Div(steps, b.Max(b.Sub(out, b.f32(1.0)), b.f32(1.0))), b.f32(0.5))   # o/(out−1)
        place = b.Add(b.Mul(start, span), b.Mul(b.Mul(fraction, b.Sub(end, start)), span))          # x_a(o)
        first = b.Floor(place)
        inside = b.Cast(b.And(b.GreaterOrEqual(place, b.f32(0.0)), b.LessOrEqual(place, span)), to=1)
        pixels = b.Range(b.f32(0.0), b.Reshape(size, b.i64([])), b.f32(1.0))                         # [in_a]
        column = b.Unsqueeze(pixels, b.i64([1]))
        taps = [(i, b.f32(d) if isinstance(d, float) else d)
                for i, d in _weight_derivatives(b, b.Sub(place, first), "cubic" if mode == "cubic" else "linear", a)]
        if exclude:   # w_i = c_i m_i / S: w_i′ = (c_i′ m_i − w_i S′) / S
            kept = [b.Cast(b.And(b.GreaterOrEqual(b.Add(first, b.f32(i)), b.f32(0.0)),
                                 b.LessOrEqual(b.Add(first, b.f32(i)), span)), to=1) for i, _ in taps]
            weights = [b.Mul(c, m) for c, m in zip(_cubic_weights(b, b.Sub(place, first), a), kept)]
            total, slope_total = (functools.reduce(b.Add, terms) for terms in
                                  (weights, [b.Mul(d, m) for (_, d), m in zip(taps, kept)]))
            taps = [(i, b.Div(b.Sub(b.Mul(d, m), b.Mul(b.Div(w, total), slope_total)), total))
                    for (i, d), m, w in zip(taps, kept, weights)]
        onehot = lambda at: b.Cast(b.Equal(column, b.Unsqueeze(at, b.i64([0]))), to=1)  # noqa: E731
        at = lambda i: b.Min(b.Max(b.Add(first, b.f32(i)), b.f32(0.0)), span)  # noqa: E731   clamped x₀ + i
        difference = b.Mul(functools.reduce(b.Add, [b.Mul(onehot(at(i)), d) for i, d in taps]), inside)  # D_aᵀ
        slope = along_axis(b, n.x(0), a_axis, r, difference)                                            # D_a x
        others = [i + lead for i in range(r) if i != a_axis]
        c = b.ReduceSum(b.Mul(back(g, skip=j), slope), b.i64(others), keepdims=0)                  # [(K,) out_a]
        # onnxruntime leaves an axis whose size does not change uncropped, whatever its roi
        cropped = b.Mul(span, b.Cast(b.Not(b.Equal(out, size)), to=1))
        weights_of = lambda w: b.ReduceSum(b.Mul(c, b.Mul(w, cropped)), b.i64([-1]), keepdims=1)  # noqa: E731
        starts.append(weights_of(b.Sub(b.f32(1.0), fraction)))
        ends.append(weights_of(fraction))
    return b.Concat(*starts, *ends, axis=-1)                                                        # [(K,) 2k]


def affine_grid(n, g):
    """grid[n, p, :] = θ[n] · (base_p, 1), base the grid of the identity θ: ĝ_θ[n] = Σ_p ĝ[n, p, :]ᵀ (base_p, 1)."""
    b = n.b
    dims = n.raw(0).shape
    if dims is None or not isinstance(dims[1], int):
        refuse(n, "theta must be [N, 2, 3] or [N, 3, 4] with a static middle dim")
    d = dims[1]
    identity = np.eye(d, d + 1, dtype=np.float32)[None]

    def grad():
        base = b.AffineGrid(b.Expand(b.f32(identity), b.Shape(n.raw(0))), n.raw(1),
                            align_corners=n.attr("align_corners", 0))
        points = b.Reshape(base, b.Concat(b.Shape(n.raw(0), end=1), b.i64([-1, d]), axis=0))   # [N, P, d]
        homogeneous = b.Pad(points, b.i64([0, 0, 0, 0, 0, 1]), b.f32(1.0))                     # [N, P, d + 1]
        flat = b.Reshape(g, b.Concat(b.Shape(g, end=n.lead + 1), b.i64([-1, d]), axis=0))     # [(K,) N, P, d]
        return b.MatMul(b.Transpose(flat, perm=n.grad_perm([0, 2, 1])), homogeneous)          # [(K,) N, d, d + 1]
    return (grad, None)


PROBE_LIMIT = 1 << 26   # floats in GridSample's sampling matrix (256 MiB): beyond it the op is refused


def grid_sample(n, g):
    """For a fixed grid, y[n, c, p] = Σ_q M[n, p, q] x[n, c, q], M the sampling weights (every mode, padding and
    align_corners alike). M is read off the op itself, as GridSample of the one-hot images [N, Q, *spatial]
    (Q = ∏ spatial) on the node's grid; ĝ_x = ĝ_y · M. The grid's ĝ: `grid_sample_grid`."""
    b = n.b
    x, grid = n.raw(0).shape, n.raw(1).shape
    if x is None or grid is None or not all(isinstance(d, int) for d in list(x)[2:] + list(grid)[1:-1]):
        refuse(n, "the spatial dims of the input and the grid must be static")
    q, p = int(np.prod(list(x)[2:])), int(np.prod(list(grid)[1:-1]))
    if q * p * (x[0] if isinstance(x[0], int) else 1) > PROBE_LIMIT:
        refuse(n, f"its sampling matrix ({q}×{p} per image) is too large for the exact transposed map")
    settings = {k: n.attr(k) for k in ("align_corners", "mode", "padding_mode") if n.attr(k) is not None}

    def grad():
        eye = b.EyeLike(b.ConstantOfShape(b.i64([q, q]), value=ir.tensor([0.0], dtype=F32)))
        images = b.Expand(b.Reshape(eye, b.i64([1, q] + list(x)[2:])),
                          b.Concat(b.Shape(n.raw(0), end=1), b.i64([q] + list(x)[2:]), axis=0))
        weights = b.Reshape(b.GridSample(images, n.raw(1), **settings), b.i64([0, q, p]))      # [N, Q, P]
        flat = b.Reshape(g, b.Concat(b.Shape(g, end=n.lead + 2), b.i64([p]), axis=0))         # [(K,) N, C, P]
        back = b.MatMul(flat, b.Transpose(weights, perm=[0, 2, 1]))                            # [(K,) N, C, Q]
        return b.Reshape(back, n.grad_shape(0))
    return (grad, (lambda: grid_sample_grid(n, g)) if n.carries(1) else None)


def grid_sample_grid(n, g):
    """ĝ of the grid of a 2-D or 3-D GridSample. Along x (y, z alike) the output is Σ_i w_i(t) P(x₀ + i),
    t = ix − ⌊ix⌋, ix the unnormalised coordinate, P the image column with the node's own padding applied per
    pixel (as the spec and onnxruntime do), w the linear or cubic weights; nearest is piecewise constant (ĝ 0).
    So ∂y/∂ix = Σ_i w_i′(t) Q_i, where Q_i = GridSample at the integer x₀ + i (every x weight but one is 0 there,
    so Q_i is P(x₀ + i) interpolated along the other axes only, with the node's padding), and ∂ix/∂gx =
    (W − 1)/2 with align_corners, else W/2. ĝ_grid[n, *p, axis] = Σ_c ĝ_y[n, c, *p] ∂y/∂g_axis."""
    b = n.b
    x = n.raw(0).shape
    if x is None or len(x) not in (4, 5) or not all(isinstance(d, int) for d in x[2:]):
        refuse(n, "relevance into the grid needs a 2-D or 3-D GridSample with static spatial dims")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(n.attr("mode", "bilinear"), n.attr("mode", "bilinear"))
    if mode == "nearest":
        return n.grad_zeros(1)
    corners = n.attr("align_corners", 0)
    settings = {k: n.attr(k) for k in ("align_corners", "mode", "padding_mode") if n.attr(k) is not None}
    grid, shift, d = n.x(1), 0.0 if corners else 0.5, len(x) - 2
    components = [b.Gather(grid, b.i64([c]), axis=d + 1) for c in range(d)]               # [N, *out, 1] each
    parts = []
    for axis in range(d):   # the grid's last axis holds (x, y[, z]): x along the last spatial dim
        size = x[-1 - axis]
        scale = (size - 1) / 2 if corners else size / 2
        if scale == 0:   # one pixel with align_corners: ix = 0 whatever the grid
            parts.append(b.Mul(b.ReduceSum(g, b.i64([n.grad_axis(1)]), keepdims=1), b.f32(0.0)))
            continue
        pixel = b.Sub(b.Mul(b.Add(b.Gather(grid, b.i64(axis), axis=d + 1), b.f32(1.0)), b.f32(scale)),
                      b.f32(shift))
        floor = b.Floor(pixel)                                                              # [N, *out]
        slope = None
        for i, weight in _weight_derivatives(b, b.Sub(pixel, floor), mode):
            at = b.Unsqueeze(b.Sub(b.Div(b.Add(floor, b.f32(i + shift)), b.f32(scale)), b.f32(1.0)),
                             b.i64([d + 1]))                                                # x₀ + i, normalised
            moved = components[:axis] + [at] + components[axis + 1:]
            sampled = b.GridSample(n.x(0), b.Concat(*moved, axis=d + 1), **settings)
            term = b.Mul(sampled, b.f32(weight) if isinstance(weight, float) else b.Unsqueeze(weight, b.i64([1])))
            slope = term if slope is None else b.Add(slope, term)                           # [N, C, *out]
        parts.append(b.ReduceSum(b.Mul(g, b.Mul(slope, b.f32(scale))), b.i64([n.grad_axis(1)]), keepdims=1))
    # [(K,) N, d, *out] → [(K,) N, *out, d]
    return b.Transpose(b.Concat(*parts, axis=n.grad_axis(1)), perm=n.grad_perm([0, *range(2, d + 2), 1]))


def _weight_derivatives(b, t, mode, a=CUBIC_A):
    """(i, w_i′(t)) for the interpolation weights of the pixels ⌊x⌋ + i: i = 0, 1 (linear) or −1 … 2 (cubic,
    the spec's cubic convolution with constant a; a constant derivative as a float)."""
    if mode == "linear":
        return [(0, -1.0), (1, 1.0)]

    def outer(s):   # d/ds of a s³ − 5a s² + 8a s − 4a (1 ≤ s ≤ 2)
        return b.Add(b.Mul(b.Sub(b.Mul(s, b.f32(3 * a)), b.f32(10 * a)), s), b.f32(8 * a))

    def inner(s):   # d/ds of (a + 2) s³ − (a + 3) s² + 1 (0 ≤ s ≤ 1)
        return b.Mul(b.Sub(b.Mul(s, b.f32(3 * (a + 2))), b.f32(2 * (a + 3))), s)
    return [(-1, outer(b.Add(t, b.f32(1.0)))), (0, inner(t)), (1, b.Neg(inner(b.Sub(b.f32(1.0), t)))),
            (2, b.Neg(outer(b.Sub(b.f32(2.0), t))))]


def _cubic_weights(b, t, a):
    """The cubic convolution weights w_i(t) of the pixels ⌊x⌋ − 1 … ⌊x⌋ + 2, as _weight_derivatives orders them."""
    def outer(s):   # a s³ − 5a s² + 8a s − 4a
        return b.Sub(b.Mul(b.Add(b.Mul(b.Sub(b.Mul(s, b.f32(a)), b.f32(5 * a)), s), b.f32(8 * a)), s), b.f32(4 * a))

    def inner(s):   # (a + 2) s³ − (a + 3) s² + 1
        return b.Add(b.Mul(b.Mul(b.Sub(b.Mul(s, b.f32(a + 2)), b.f32(a + 3)), s), s), b.f32(1.0))
    return [outer(b.Add(t, b.f32(1.0))), inner(t), inner(b.Sub(b.f32(1.0), t)), outer(b.Sub(b.f32(2.0), t))]


ROI_ALIGN_ATTRS = ("coordinate_transformation_mode", "mode", "output_height", "output_width", "sampling_ratio",
                   "spatial_scale")
FAR = 1e30   # the max-mode probe's value away from the probed pixel: below any weighted pixel of a bin


def roi_align(n, g):
    """For fixed rois, each bin of y[r, c] is read from X[batch_indices[r], c] at weighted pixels. The weights
    M[r, q, p] are read off the op itself: RoiAlign of the one-hot images [1, Q, H, W] (Q = H·W) on the node's
    rois and settings. mode=avg: y = M·x, ĝ_x[q] = Σ_p ĝ_y[p] M[p, q]. mode=max (onnxruntime's: the largest
    weighted pixel w·x[q] over the bin's samples and corners): ∂y_p/∂x_q is the weight of the winning term,
    the largest weight on q where x[q] > 0 (the probe of e_q), the smallest where x[q] < 0 (minus the probe of
    −e_q − FAR·(1 − e_q)), found by y_p = w·x[q] (ties split evenly). ĝ of each roi goes to its batch row."""
    b = n.b
    x = n.raw(0).shape
    if x is None or len(x) != 4 or not all(isinstance(d, int) for d in x[1:]):
        refuse(n, "the channels and spatial dims of X must be static")
    q = x[2] * x[3]
    bins = int(n.attr("output_height", 1)) * int(n.attr("output_width", 1))
    if q * (q + bins * x[1]) > PROBE_LIMIT:
        refuse(n, f"its sampling matrix ({q}×{bins} per roi) is too large for the exact transposed map")
    settings = {k: n.attr(k) for k in ROI_ALIGN_ATTRS if n.attr(k) is not None}
    rois, batch = n.raw(1), n.raw(2)
    lead = n.lead

    def weights(images):
        """[R, P, Q]: RoiAlign of the probe images (channel q) on the node's rois, all read from image 0."""
        zeros = b.Mul(batch, b.i64(0))
        sampled = b.RoiAlign(images, rois, zeros, **settings)                              # [R, Q, oh, ow]
        return b.Transpose(b.Reshape(sampled, b.i64([0, q, bins])), perm=[0, 2, 1])

    def grad():
        onehot = b.Reshape(b.EyeLike(b.ConstantOfShape(b.i64([q, q]), value=ir.tensor([0.0], dtype=F32))),
                           b.i64([1, q, x[2], x[3]]))
        flat = b.Reshape(g, b.Concat(b.Shape(g, end=lead + 2), b.i64([1, bins]), axis=0))   # [(K,) R, C, 1, P]
        if n.attr("mode", "avg") == "avg":
            jacobian = b.Unsqueeze(weights(onehot), b.i64([1]))                              # [R, 1, P, Q]
        else:
            largest, smallest = weights(onehot), b.Neg(weights(b.Where(b.Cast(onehot, to=9), b.f32(-1.0), b.f32(-FAR))))
            pixels = b.Reshape(b.Gather(n.x(0), batch, axis=0), b.i64([0, 0, 1, q]))       # [R, C, 1, Q]
            y = b.Reshape(n.y(), b.i64([0, 0, bins, 1]))                                    # [R, C, P, 1]

            def winning(w, sign):
                hit = b.And(b.Equal(y, b.Mul(b.Unsqueeze(w, b.i64([1])), pixels)), sign)
                return b.Cast(hit, to=1)
            hits = [winning(largest, b.Greater(pixels, b.f32(0.0))), winning(smallest, b.Less(pixels, b.f32(0.0)))]
            count = b.Max(b.ReduceSum(b.Add(*hits), b.i64([-1]), keepdims=1), b.f32(1.0))
            jacobian = b.Div(b.Add(b.Mul(hits[0], b.Unsqueeze(largest, b.i64([1]))),
                                   b.Mul(hits[1], b.Unsqueeze(smallest, b.i64([1])))), count)   # [R, C, P, Q]
        per_roi = b.MatMul(flat, jacobian)                                                   # [(K,) R, C, 1, Q]
        per_roi = b.Reshape(per_roi, b.Concat(b.Shape(g, end=lead + 1), b.i64([x[1] * q]), axis=0))
        images = b.Range(b.i64(0), b.Reshape(b.Shape(n.raw(0), end=1), b.i64([])), b.i64(1))
        owner = b.Cast(b.Equal(b.Unsqueeze(images, b.i64([1])), b.Unsqueeze(batch, b.i64([0]))), to=1)   # [N, R]
        return b.Reshape(b.MatMul(owner, per_roi), n.grad_shape(0))                          # [(K,) N, C·Q]
    return (grad, (lambda: roi_align_rois(n, g)) if n.carries(1) else None, None)


def roi_align_rois(n, g):
    """ĝ of the rois of RoiAlign with a fixed sampling_ratio G. Bin (ph, pw) reads the G×G samples at
    y = y₁·s − ½ + (ph + (i + ½)/G)/PH · (y₂ − y₁)·s (x alike; no −½ with output_half_pixel, where a roi shorter
    than 1 counts as 1), each through its four bilinear terms w_y·w_x·X[row, column] with onnxruntime's rules:
    all 0 beyond [−1, H], y ≤ 0 read at 0, y past H − 1 at H − 1 (w_y = 1 − l_y at the low row, l_y at the high
    one, l_y = y − y_low, held 0 where y is clamped). mode=avg averages the bin's G² samples (each the sum of its
    terms); mode=max takes the bin's largest term (onnxruntime's), its ĝ split evenly among ties. ∂term/∂y = ±w_x·X (0 clamped or outside), and
    ∂y/∂y₁ = s·(1 − u), ∂y/∂y₂ = s·u, u the sample's fraction of the roi."""
    b = n.b
    _, _, height, width = n.raw(0).shape
    ratio, mode = int(n.attr("sampling_ratio", 0)), n.attr("mode", "avg")
    if ratio <= 0:
        refuse(n, "relevance into the rois needs a fixed sampling_ratio (an adaptive one depends on the roi)")
    half = n.attr("coordinate_transformation_mode", "half_pixel") == "half_pixel"
    scale = float(n.attr("spatial_scale", 1.0))
    bins = int(n.attr("output_height", 1)), int(n.attr("output_width", 1))
    rois, batch = n.x(1), n.raw(2)
    images = b.Reshape(b.Gather(n.x(0), batch, axis=0), b.i64([0, 0, height * width]))    # [R, C, H·W]

    def coordinates(first: int, count: int):
        """Sample positions along one axis [R, count·G], and their derivatives by the roi's start and end."""
        start, end = (b.Slice(rois, b.i64([k]), b.i64([k + 1]), b.i64([1])) for k in (first, first + 2))
        length = b.Mul(b.Sub(end, start), b.f32(scale))
        fraction = b.f32(np.array([(p + (i + 0.5) / ratio) / count for p in range(count) for i in range(ratio)],
                                  np.float32))
        if half:
            origin, by_end = b.Sub(b.Mul(start, b.f32(scale)), b.f32(0.5)), b.Mul(fraction, b.f32(scale))
            return b.Add(origin, b.Mul(fraction, length)), b.Sub(b.f32(scale), by_end), by_end
        stretched = b.Cast(b.GreaterOrEqual(length, b.f32(1.0)), to=1)                     # else the length is 1
        place = b.Add(b.Mul(start, b.f32(scale)), b.Mul(fraction, b.Max(length, b.f32(1.0))))
        by_end = b.Mul(b.Mul(fraction, b.f32(scale)), stretched)
        return place, b.Sub(b.f32(scale), by_end), by_end

    def terms(place, size: int, dim: int):
        """[(index, w, ∂w/∂place)] of the low and the high pixel along one axis, onnxruntime's bilinear rules,
        0 outside; w spread to [R, 1, S, 1] (dim 2) or [R, 1, 1, S] (dim 3)."""
        spread = lambda v: b.Unsqueeze(b.Cast(v, to=1), b.i64([1, 5 - dim]))  # noqa: E731
        inside = spread(b.And(b.GreaterOrEqual(place, b.f32(-1.0)), b.LessOrEqual(place, b.f32(float(size)))))
        clamped = b.Max(place, b.f32(0.0))
        low = b.Floor(clamped)
        free = b.And(b.Greater(place, b.f32(0.0)), b.Less(low, b.f32(size - 1.0)))
        low = b.Min(low, b.f32(size - 1.0))
        high = b.Min(b.Add(low, b.f32(1.0)), b.f32(size - 1.0))
        weight = spread(b.Where(free, b.Sub(clamped, low), b.f32(0.0)))
        slope = b.Mul(spread(free), inside)
        return [(b.Cast(low, to=7), b.Mul(b.Sub(b.f32(1.0), weight), inside), b.Neg(slope)),
                (b.Cast(high, to=7), b.Mul(weight, inside), slope)]

    def pixels(row, column):   # X[b_r, c, row, column] for every sample: [R, C, PH·G, PW·G]
        at = b.Add(b.Mul(b.Unsqueeze(row, b.i64([2])), b.i64(width)), b.Unsqueeze(column, b.i64([1])))
        flat = b.Reshape(at, b.i64([0, 1, -1]))
        picked = b.GatherElements(images, b.Expand(flat, b.Concat(b.Shape(images, end=2), b.Shape(flat, start=2),
                                                                  axis=0)), axis=2)
        return b.Reshape(picked, b.Concat(b.Shape(images, end=2), b.Shape(row, start=1), b.Shape(column, start=1),
                                          axis=0))

    ys, dy1, dy2 = coordinates(1, bins[0])                                                  # [R, PH·G]
    xs, dx1, dx2 = coordinates(0, bins[1])                                                  # [R, PW·G]
    # each sample's four terms: (value, ∂/∂y, ∂/∂x), [R, C, PH·G, PW·G]
    four = [(b.Mul(b.Mul(wy, wx), p), b.Mul(b.Mul(dwy, wx), p), b.Mul(b.Mul(wy, dwx), p))
            for row, wy, dwy in terms(ys, height, 2) for column, wx, dwx in terms(xs, width, 3)
            for p in [pixels(row, column)]]

    def per_bin(t, reduce):
        """`reduce` (ReduceMax / ReduceSum) over each bin's G×G samples, spread back over them."""
        blocks = b.Reshape(t, b.Concat(b.Shape(t, end=2), b.i64([bins[0], ratio, bins[1], ratio]), axis=0))
        return b.Reshape(b.Expand(reduce(blocks, b.i64([3, 5]), keepdims=1), b.Shape(blocks)), b.Shape(t))

    if mode == "avg":
        shares = [b.f32(1.0 / ratio ** 2)] * 4
    else:   # the winning terms: equal to the bin's largest term (computed here, the same way for all)
        largest = per_bin(functools.reduce(b.Max, [value for value, _, _ in four]), b.ReduceMax)
        hits = [b.Cast(b.Equal(value, largest), to=1) for value, _, _ in four]
        count = per_bin(functools.reduce(b.Add, hits), b.ReduceSum)
        shares = [b.Div(hit, count) for hit in hits]
    lead = n.lead
    pooled = b.Reshape(g, b.Concat(b.Shape(g, end=lead + 2), b.i64([bins[0], 1, bins[1], 1]), axis=0))
    spread_g = b.Reshape(b.Expand(pooled, b.Concat(b.Shape(g, end=lead + 2),
                                                   b.i64([bins[0], ratio, bins[1], ratio]), axis=0)),
                         b.Concat(b.Shape(g, end=lead + 2), b.i64([bins[0] * ratio, bins[1] * ratio]), axis=0))
    by = [functools.reduce(b.Add, [b.Mul(share, slopes[k]) for share, (_, *slopes) in zip(shares, four)])
          for k in (0, 1)]                                                                  # ∂(bin)/∂(y, x)
    by_y = b.ReduceSum(b.Mul(spread_g, by[0]), b.i64([lead + 1, lead + 3]), keepdims=0)    # [(K,) R, PH·G]
    by_x = b.ReduceSum(b.Mul(spread_g, by[1]), b.i64([lead + 1, lead + 2]), keepdims=0)    # [(K,) R, PW·G]
    total = lambda v, d: b.ReduceSum(b.Mul(v, d), b.i64([-1]), keepdims=1)  # noqa: E731
    return b.Concat(total(by_x, dx1), total(by_y, dy1), total(by_x, dx2), total(by_y, dy2), axis=-1)   # [(K,) R, 4]
