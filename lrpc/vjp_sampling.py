"""VJPs of the resampling ops: Resize (Upsample becomes Resize), GridSample, AffineGrid (docs/design.md, "Relevance
semantics"). For fixed coordinates each is linear in its data input, and its VJP is the transposed map."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.vjp_common import refuse

F32 = ir.DataType.FLOAT
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
    ĝ_x applies each M_aᵀ to ĝ_y along its axis."""
    b = n.b
    if any(n.carries(i) for i in (1, 2) if i < len(n.inputs)):
        refuse(n, "relevance into roi or scales (the sampling coordinates) is not supported")
    use_scales = _given(n, 2)
    if not use_scales and n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        refuse(n, f"keep_aspect_ratio_policy={n.attr('keep_aspect_ratio_policy')} is not supported")
    r = n.rank(0)
    if r is None:
        refuse(n, "the rank of the input must be known")
    axes = [a % r for a in (n.attr("axes") or range(r))]
    cropping = n.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
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

    def grad():
        grad, last = g, r - 1 + n.lead
        for j, a in enumerate(axes):
            if _identity_axis(n, j, a, use_scales, cropping):
                continue
            ga = n.grad_axis(a)
            swap = list(range(last + 1))
            swap[ga], swap[last] = last, ga
            moved = grad if ga == last else b.Transpose(grad, perm=swap)
            back = b.MatMul(moved, b.Transpose(probe(j, a), perm=[1, 0]))
            grad = back if ga == last else b.Transpose(back, perm=swap)
        return grad
    return (grad,) + (None,) * (len(n.inputs) - 1)


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
    (Q = ∏ spatial) on the node's grid; ĝ_x = ĝ_y · M."""
    b = n.b
    if n.carries(1):
        refuse(n, "relevance into the grid (the sampling coordinates) is not supported")
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
    return (grad, None)
