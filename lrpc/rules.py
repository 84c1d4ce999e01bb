"""The rule table: op type → local rule, in the style of a reverse-mode autodiff transpose table.

A local rule receives `n` (the node's forward values in float32, the builder, its attributes) and
`g`, the modified gradient ĝ of its first output (all outputs' in `n.grads`). It returns one entry
per input: a thunk that emits ĝ for that input, or None where nothing flows. The emitter calls a
thunk only for inputs that carry relevance, and undoes broadcasting for ops in BROADCASTING.

`VJP` holds the exact vector–Jacobian products (the ε-rule with ε → 0 and structural ops, DESIGN.md
"Relevance semantics"); `LRP_RULES` holds the AttnLRP rules the passes assign to single nodes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.graph import PREFIX, attr as node_attr, const_array, same_dim

ACTIVATION_EPS = 1e-10   # identity rule (Eq. 9): ĝ_u = ĝ_v ⊙ v / (u + ε·sign(u)), sign(0) = 1

BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Expand", "Sum", "Max", "Min", "PRelu",
                "BitwiseAnd", "Mean"}


# ---- small shared pieces ---------------------------------------------------------------------

def _same(g):
    return (lambda: g,)


def _reshape_back(n, g):
    return (lambda: n.b.Reshape(g, n.grad_shape(0)),)


def _pointwise(derivative):
    """Rows for y = f(x): ĝ_x = ĝ_y ⊙ f'(x), with f' written in terms of n (x = n.x(0), y = n.y())."""
    return lambda n, g: (lambda: n.b.Mul(g, derivative(n)),)


def _reduce(n, g, scale=None):
    """ĝ of a reduction: unsqueeze the reduced axes back (if dropped), broadcast to x, scale by ∂y/∂x."""
    b, x = n.b, n.raw(0)
    axes = n.raw(1) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    keep = n.attr("keepdims", 1)
    if not keep and axes is not None:
        g = b.Unsqueeze(g, b.Cast(axes, to=7))
    grad = b.Expand(g, b.Shape(x))
    return grad if scale is None else b.Mul(grad, scale(n, keep, axes))


def _kept(n, value, keep, axes):
    """A reduction output reshaped so it broadcasts against the input (keepdims=1 form)."""
    return value if keep or axes is None else n.b.Unsqueeze(value, n.b.Cast(axes, to=7))


def _mean_scale(n, keep, axes):
    b = n.b  # 1/N with N = |x| / |y|, the number of elements averaged into each output
    return b.Div(b.Cast(b.Size(n.raw_out(0)), to=1), b.Cast(b.Size(n.raw(0)), to=1))


def _swap_last(n, v, r):
    perm = list(range(r - 2)) + [r - 1, r - 2]
    return n.b.Transpose(v, perm=perm)


def _matmul(n, g):
    """y = a @ b (numpy matmul semantics, rank-1 operands promoted). Each thunk needs only the rank of
    the operand it transposes, so a weight of known rank suffices when the activation's rank is unknown."""
    b = n.b
    ra, rb = n.rank(0), n.rank(1)

    def known(r, i):
        if r is None:
            raise LrpcError(f"node '{n.node.name}' (MatMul): rank of operand {i} unknown after shape inference; "
                            "re-export the model with static ranks")
        return r
    if rb == 1:   # y[..., m] = a[..., m, k] · b[k]
        return (lambda: b.Mul(b.Unsqueeze(g, b.i64([-1])), n.x(1)),
                lambda: b.ReduceSum(b.Mul(n.x(0), b.Unsqueeze(g, b.i64([-1]))),
                                    b.i64(list(range(known(ra, 0) - 1))), keepdims=0) if ra != 1 else b.Mul(n.x(0), g))
    if ra == 1:   # y[..., n] = a[k] · b[..., k, n]
        return (lambda: b.ReduceSum(b.Mul(b.Unsqueeze(g, b.i64([-2])), n.x(1)),
                                    b.i64(list(range(known(rb, 1) - 2)) + [rb - 1]), keepdims=0),
                lambda: b.Mul(b.Unsqueeze(n.x(0), b.i64([-1])), b.Unsqueeze(g, b.i64([-2]))))
    if rb == 2 and ra is not None and ra >= 2 and n.raw(1) not in n.em.carrying:
        return (lambda: _matmul_weight_grad(n, g), None)
    # only the batch dims (all but the last two) can have been broadcast
    if _is_swap_of_full_batch(n, 1):  # b = kᵀ (attention scores q·kᵀ): ĝ_k = ĝᵀ·a directly, as (ĝᵀ·a)ᵀᵀ
        grad_b = lambda: _swap_last(n, b.MatMul(_swap_last(n, g, rb), n.x(0)), rb)  # noqa: E731
    else:
        grad_b = lambda: n.unbroadcast(b.MatMul(_swap_last(n, n.x(0), known(ra, 0)), g), 1, core=2)  # noqa: E731
    return (lambda: n.unbroadcast(b.MatMul(g, _swap_last(n, n.x(1), known(rb, 1))), 0, core=2), grad_b)


def _is_swap_of_full_batch(n, i: int) -> bool:
    """Operand i is a Transpose swapping the last two axes of a carrying tensor and has the output's batch
    dims: its ĝ can be emitted transposed back, and the Transpose's own VJP (a transpose) cancels it."""
    v, y = n.raw(i), n.raw_out(0)
    producer = v.producer()
    while producer is not None and producer.op_type == "Mul":  # through scalar scaling, as in q·√s @ (kᵀ·√s)
        scalars = [x for x in producer.inputs if x is not None and x.shape is not None and x.shape.rank() == 0]
        carried = [x for x in producer.inputs if x in n.em.carrying]
        if len(scalars) != 1 or len(carried) != 1:
            return False
        producer = carried[0].producer()
    if producer is None or producer.op_type != "Transpose" or producer.inputs[0] not in n.em.carrying:
        return False
    r, perm = n.rank(i), list(node_attr(producer, "perm") or [])
    if r is None or r < 3 or perm != list(range(r - 2)) + [r - 1, r - 2] or y.shape is None or y.shape.rank() != r \
            or n.rank(1 - i) != r:
        return False
    return all(same_dim(d, e) for d, e in zip(list(v.shape)[:-2], list(y.shape)[:-2]))


def _matmul_weight_grad(n, g):
    """ĝ_a of y = a @ W for a rank-2 weight W [K, N] that carries no relevance: ĝ_y · Wᵀ as a Gemm with
    transB=1 on ĝ_y flattened to [-1, N], so no transposed copy of W is ever stored (onnxruntime's constant
    folding would keep one per Transpose(W)). The Reshape back to [..., K] also keeps the Gemm's output
    from feeding a Sum directly (GemmSumFusion crashes on that pattern)."""
    b, w = n.b, n.raw(1)
    dims = list(w.shape) if w.shape is not None else [None, None]
    cols = b.i64([-1, dims[1]]) if isinstance(dims[1], int) else b.Concat(b.i64([-1]), b.Shape(w, start=1), axis=0)
    flat = b.Gemm(b.Reshape(g, cols), n.x(1), transB=1)
    # ĝ_a is shaped like a (its one row, when ĝ is row-compact); every ĝ·Wᵀ into a reshapes to the same
    # target, which lets optimise.accumulate_in_gemm sum them
    return b.Reshape(flat, n.grad_shape(0))


def _gemm(n, g):
    """y = α A'B' + βC (A' = Aᵀ if transA, B' = Bᵀ if transB). The VJPs are emitted as MatMul, not Gemm:
    onnxruntime's GemmSumFusion crashes on an emitted Gemm whose output is summed with another ĝ."""
    b = n.b
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    ta, tb = n.attr("transA", 0), n.attr("transB", 0)
    t = lambda v: b.Transpose(v, perm=[1, 0])  # noqa: E731
    scale = (lambda v: v) if alpha == 1.0 else (lambda v: b.Mul(v, b.f32(alpha)))
    b_prime = lambda: t(n.x(1)) if tb else n.x(1)  # noqa: E731
    a_prime = lambda: t(n.x(0)) if ta else n.x(0)  # noqa: E731
    grad_a = (lambda: scale(b.MatMul(b_prime(), t(g)))) if ta else (lambda: scale(b.MatMul(g, t(b_prime()))))
    grad_b = (lambda: scale(b.MatMul(t(g), a_prime()))) if tb else (lambda: scale(b.MatMul(t(a_prime()), g)))
    grad_c = lambda: n.unbroadcast_to(b.Mul(g, b.f32(beta)), n.raw(2), n.raw_out(0))
    return (grad_a, grad_b, grad_c)


def _conv(n, g):
    b = n.b
    if n.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise LrpcError(f"node '{n.node.name}' (Conv): auto_pad={n.attr('auto_pad')} is not supported; "
                        "re-export with explicit pads")
    kw = dict(strides=n.attr("strides"), pads=n.attr("pads"), dilations=n.attr("dilations"),
              group=n.attr("group", 1))
    x, w, y = n.raw(0), n.raw(1), n.raw_out(0)
    out_pad = None
    if x.shape is not None and y.shape is not None and w.shape is not None and x.shape.is_static() \
            and y.shape.is_static() and w.shape.is_static():
        spatial = x.shape.rank() - 2
        strides = kw["strides"] or [1] * spatial
        pads = kw["pads"] or [0] * (2 * spatial)
        dil = kw["dilations"] or [1] * spatial
        out_pad = []
        for i in range(spatial):
            full = (y.shape[i + 2] - 1) * strides[i] - pads[i] - pads[i + spatial] + dil[i] * (w.shape[i + 2] - 1) + 1
            out_pad.append(int(x.shape[i + 2] - full))
        out_pad = out_pad if any(out_pad) else None
    return (lambda: b.ConvTranspose(g, n.x(1), output_padding=out_pad, **kw),
            lambda: (_ for _ in ()).throw(LrpcError(f"node '{n.node.name}' (Conv): weights that depend on the "
                                                    "input are not supported")),
            lambda: b.ReduceSum(g, b.i64([0] + list(range(2, n.rank(0)))), keepdims=0))


def _concat(n, g):
    b, axis = n.b, n.attr("axis")
    end = axis + 1 if axis + 1 != 0 else None
    sizes = b.Concat(*[b.Shape(i, start=axis, end=end) for i in n.inputs], axis=0)
    pieces = n.cached("split", lambda: b.Split(g, sizes, axis=axis, _outputs=len(n.inputs)))
    one = lambda i: (pieces() if len(n.inputs) > 1 else (pieces(),))[i]
    return tuple((lambda i=i: one(i)) for i in range(len(n.inputs)))


def _split(n, g):
    b = n.b
    parts = [gi if gi is not None else n.zeros_like_out(i) for i, gi in enumerate(n.grads)]
    return (lambda: b.Concat(*parts, axis=n.attr("axis", 0)),)


def _slice(n, g):
    """y = x[starts:ends:steps] along `axes`. Unit steps: ĝ_x is ĝ_y zero-padded (s before, d − e after);
    other steps: ĝ_y is scattered back, axis by axis, to the indices the slice read."""
    b = n.b
    x, r = n.raw(0), n.rank(0)
    starts, ends = b.Cast(n.raw(1), to=7), b.Cast(n.raw(2), to=7)
    has = lambda i: len(n.inputs) > i and n.inputs[i] is not None  # noqa: E731
    count = len(n.const(1)) if n.const(1) is not None else None
    axes_const = n.const(3) if has(3) else (np.arange(count) if count is not None else None)
    if axes_const is None and not has(3):
        raise LrpcError(f"node '{n.node.name}' (Slice): run-time starts without axes are not supported")
    axes = b.Cast(n.raw(3), to=7) if has(3) else b.i64(list(axes_const))
    steps = n.const(4) if has(4) else np.ones(1, np.int64)
    if steps is None or np.any(steps != 1):
        if r is None or axes_const is None:
            raise LrpcError(f"node '{n.node.name}' (Slice): a strided slice needs a known rank and constant axes")
        return (lambda: _slice_scatter(n, g, starts, ends, [int(a) % r for a in axes_const]),)

    static = _static_slice_pads(n, axes_const)
    if static is not None:
        def padded():
            grad = b.Pad(g, b.i64(static), mode="constant")
            grad.type, grad.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(n.dims(0))  # for pads_to_concat
            return grad
        return (padded,)

    def pad():
        dims = b.Gather(b.Shape(x), axes)
        zero = b.i64([0])
        s = _clamp_index(b, starts, dims, zero)
        after = b.Sub(dims, b.Max(_clamp_index(b, ends, dims, zero), s))
        if r is None or axes_const is None:
            return b.Pad(g, b.Concat(s, after, axis=0), None, axes, mode="constant")
        # full-rank pads without the `axes` input (onnxruntime's transpose optimizer mishandles that form)
        where = {int(a) % r: i for i, a in enumerate(axes_const)}
        pick = lambda v, d: b.Slice(v, b.i64([where[d]]), b.i64([where[d] + 1])) if d in where else zero  # noqa
        return b.Pad(g, b.Concat(*[pick(s, d) for d in range(r)], *[pick(after, d) for d in range(r)], axis=0),
                     mode="constant")
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
    b, r = n.b, n.rank(0)
    steps = b.Cast(n.raw(4), to=7)
    grad = g
    for i, axis in enumerate(axes):
        one = lambda v: b.Slice(v, b.i64([i]), b.i64([i + 1]))  # noqa: E731
        dim = b.Shape(n.raw(0), start=axis, end=axis + 1)
        read = b.Slice(b.Range(b.i64(0), b.Squeeze(dim, b.i64([0])), b.i64(1)), one(starts), one(ends), b.i64([0]),
                       one(steps))
        index = b.Expand(b.Reshape(read, b.i64([1] * axis + [-1] + [1] * (r - axis - 1))), b.Shape(grad))
        target = b.Concat(*([b.Shape(grad, end=axis)] if axis > 0 else []), dim,
                          *([b.Shape(grad, start=axis + 1)] if axis + 1 < r else []), axis=0)
        grad = b.ScatterElements(n.zeros_like(target), index, grad, axis=axis)
    return grad


def _gather(n, g):
    """y = take(x, idx, axis): ĝ_x scatter-adds ĝ_y back to the positions read (indices may repeat)."""
    b = n.b
    axis, r = n.attr("axis", 0), n.rank(0)
    axis = axis % r if r is not None else axis
    flat = lambda: b.Reshape(b.Cast(n.raw(1), to=7), b.i64([-1]))

    def rows(flat_idx):  # ĝ_y with the index axes flattened into one: [*x.shape[:axis], n, *x.shape[axis+1:]]
        pieces = ([b.Shape(n.raw(0), end=axis)] if axis > 0 else []) + [b.Shape(flat_idx)] + \
                 [b.Shape(n.raw(0), start=axis + 1)]
        return b.Reshape(g, b.Concat(*pieces, axis=0))

    def scatter_rows():  # axis 0 needs no rank: ScatterND adds whole slices x[idx_k] += ĝ_k
        idx = flat()
        return b.ScatterND(n.zeros_like(b.Shape(n.raw(0))), b.Unsqueeze(idx, b.i64([-1])), rows(idx), reduction="add")

    def scatter_elements():
        if r is None:
            raise LrpcError(f"node '{n.node.name}' (Gather): data rank unknown; re-export with static ranks")
        idx = flat()
        g_r = rows(idx)
        index = b.Expand(b.Reshape(idx, b.i64([1] * axis + [-1] + [1] * (r - axis - 1))), b.Shape(g_r))
        return b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), index, g_r, axis=axis, reduction="add")
    return (scatter_rows if axis == 0 else scatter_elements, None)


def _gather_elements(n, g):
    b = n.b
    return (lambda: b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), n.raw(1), g, axis=n.attr("axis", 0),
                                      reduction="add"), None)


def _gather_nd(n, g):
    """GatherND: ĝ_data scatter-adds ĝ_y back to the slices read (batch_dims = 0)."""
    b = n.b
    if n.attr("batch_dims", 0) != 0:
        raise LrpcError(f"node '{n.node.name}' (GatherND): batch_dims ≠ 0 on a relevance-carrying tensor is not "
                        "supported")
    return (lambda: b.ScatterND(n.zeros_like(b.Shape(n.raw(0))), b.Cast(n.raw(1), to=7), g, reduction="add"), None)


def _where(n, g):
    b, zero = n.b, n.b.f32(0.0)
    return (None, lambda: b.Where(n.raw(0), g, zero), lambda: b.Where(n.raw(0), zero, g))


def _pow(n, g):
    b = n.b

    def exponent_grad():
        raise LrpcError(f"node '{n.node.name}' (Pow): an exponent that carries relevance is not supported")
    p = n.x(1)
    return (lambda: b.Mul(g, b.Mul(p, b.Pow(n.x(0), b.Sub(p, b.f32(1.0))))), exponent_grad)


def _softmax(n, g):
    """y = softmax(x): ĝ_x = y ⊙ (ĝ_y − Σ ĝ_y ⊙ y). Equals the AttnLRP softmax rule (Prop. 3.1) times x."""
    b, y = n.b, n.y()

    def grad_x():
        weighted = _attention_weighted_sum(n)
        if weighted is None:
            weighted = b.ReduceSum(b.Mul(g, y), b.i64([n.attr("axis", -1)]), keepdims=1)
        return b.Mul(y, b.Sub(g, weighted))
    return (grad_x,)


def _attention_weighted_sum(n):
    """Σ_j ĝ_y[i, j]·y[i, j] read off the attention output o = y @ v instead of the [.., T, T] scores: with
    ĝ_y = c·ĝ_o·vᵀ (c = ½ under the uniform rule), it is c·Σ_d ĝ_o[i, d]·o[i, d] (as FlashAttention's
    backward does). None unless y's only reader is that product, as its left operand, over the last axis."""
    y, em = n.raw_out(0), n.em
    r = n.rank(0)
    if r is None or n.attr("axis", -1) % r != r - 1:
        return None
    while True:  # through value-preserving steps (TorchScript exports cast the weights to the query's dtype)
        readers = [node for node, _ in y.uses() if not node.name.startswith(PREFIX)]  # forward readers
        if len(readers) != 1 or y.is_graph_output():
            return None
        if readers[0].op_type not in ("Cast", "Identity", "Dropout") or readers[0].outputs[0].dtype != y.dtype:
            break
        y = readers[0].outputs[0]
    product = readers[0]
    o = product.outputs[0]
    if product.op_type != "MatMul" or product.inputs[0] is not y or product.inputs[1] is y or o.shape is None \
            or o.shape.rank() != r or not all(same_dim(a, c) for a, c in zip(list(y.shape)[:-1], list(o.shape)[:-1])):
        return None
    record = em.plan.get(product)
    scale = {None: 1.0, "uniform": 0.5}.get(record.rule if record is not None else None)
    grad_o = em.totals.get(o)
    if scale is None or grad_o is None:
        return None
    row = (n.compact.axis, n.compact.rank) if n.compact is not None else None
    if row is not None and not em.readable(o, *row):
        return None
    if em.compact_of(grad_o) != row:
        if row is not None:
            return None
        grad_o = em.widen(grad_o)
    b, width = n.b, o.shape[-1]
    products = b.Mul(grad_o, n.f32(o))
    if isinstance(width, int):  # the scaled row sum as one product with a constant column (no extra kernel)
        return b.MatMul(products, b.f32(np.full((width, 1), scale, np.float32)))
    total = b.ReduceSum(products, b.i64([-1]), keepdims=1)
    return total if scale == 1.0 else b.Mul(total, b.f32(scale))


def _log_softmax(n, g):
    b = n.b
    return (lambda: b.Sub(g, b.Mul(b.Exp(n.y()), b.ReduceSum(g, b.i64([n.attr("axis", -1)]), keepdims=1))),)


def layer_norm_grad(n, g, frozen_std: bool):
    """LayerNormalization: y = (x − μ)/σ · w + β over axes [axis, rank). With the std frozen (Prop. 3.4)
    only the centring is differentiated: ĝ_x = (h − mean h)/σ, h = ĝ_y·w; exactly, also − x̂·mean(h·x̂)/σ."""
    b = n.b
    r = n.rank(0)
    axis = n.attr("axis", -1)
    if r is None and axis >= 0:
        raise LrpcError(f"node '{n.node.name}' (LayerNormalization): input rank unknown")
    axes = b.i64(list(range(axis, r)) if axis >= 0 else list(range(axis, 0)))
    x = n.x(0)
    mean = lambda v: b.ReduceMean(v, axes, keepdims=1)
    centred = b.Sub(x, mean(x))
    inv_std = b.Reciprocal(b.Sqrt(b.Add(mean(b.Mul(centred, centred)), b.f32(n.attr("epsilon", 1e-5)))))
    h = b.Mul(g, n.x(1))
    grad = b.Sub(h, mean(h))
    if not frozen_std:
        x_hat = b.Mul(centred, inv_std)
        grad = b.Sub(grad, b.Mul(x_hat, mean(b.Mul(h, x_hat))))
    return b.Mul(grad, inv_std)


def _layer_norm(n, g):
    b = n.b
    return (lambda: layer_norm_grad(n, g, frozen_std=False),
            lambda: n.unbroadcast_to(b.Mul(g, _normalised(n)), n.raw(1), n.raw_out(0)),
            lambda: n.unbroadcast_to(g, n.raw(2), n.raw_out(0)))


def _normalised(n):
    b = n.b
    r, axis = n.rank(0), n.attr("axis", -1)
    axes = b.i64(list(range(axis, r)) if axis >= 0 else list(range(axis, 0)))
    x = n.x(0)
    centred = b.Sub(x, b.ReduceMean(x, axes, keepdims=1))
    var = b.ReduceMean(b.Mul(centred, centred), axes, keepdims=1)
    return b.Div(centred, b.Sqrt(b.Add(var, b.f32(n.attr("epsilon", 1e-5)))))


def _lp_norm(n, g):
    """y = x / ‖x‖₂ along axis: ĝ_x = (ĝ_y − y·Σ ĝ_y·y)/‖x‖."""
    b = n.b
    if n.attr("p", 2) != 2:
        raise LrpcError(f"node '{n.node.name}' (LpNormalization): only p = 2 is supported")
    axis = b.i64([n.attr("axis", -1)])
    y = n.y()
    norm = b.ReduceL2(n.x(0), axis, keepdims=1)
    return (lambda: b.Div(b.Sub(g, b.Mul(y, b.ReduceSum(b.Mul(g, y), axis, keepdims=1))), norm),)


def _einsum(n, g):
    eq = n.attr("equation").replace(" ", "")
    lhs, out = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if out is None or len(terms) != 2 or "." in eq:
        raise LrpcError(f"node '{n.node.name}' (Einsum '{eq}'): only explicit two-operand equations without "
                        "ellipsis are supported")
    a, c = terms

    def grad(i):
        own, other = (a, c) if i == 0 else (c, a)
        if not set(own) <= set(out) | set(other):
            raise LrpcError(f"node '{n.node.name}' (Einsum '{eq}'): an index summed inside one operand is not "
                            "supported")
        return n.b.Einsum(g, n.x(1 - i), equation=f"{out},{other}->{own}")
    return (lambda: grad(0), lambda: grad(1))


def _clip(n, g):
    b = n.b
    x = n.x(0)
    keep = b.f32(1.0)
    if len(n.inputs) > 1 and n.inputs[1] is not None:
        keep = b.Mul(keep, b.Cast(b.GreaterOrEqual(x, n.x(1)), to=1))
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        keep = b.Mul(keep, b.Cast(b.LessOrEqual(x, n.x(2)), to=1))
    return (lambda: b.Mul(g, keep), None, None)


def _extremum(n, g):
    """Elementwise Max/Min: the gradient goes to the operand(s) equal to the result, split evenly between
    tied operands (as torch does), so relevance is not counted twice."""
    b = n.b
    masks = n.cached("masks", lambda: [b.Cast(b.Equal(n.x(i), n.y()), to=1) for i in range(len(n.inputs))])
    count = n.cached("count", lambda: masks()[0] if len(n.inputs) == 1 else b.Sum(*masks()))
    return tuple((lambda i=i: b.Mul(g, b.Div(masks()[i], count()))) for i in range(len(n.inputs)))


def _reduce_extremum(n, g):
    """ReduceMax/Min: ĝ goes to the element(s) equal to the result, split evenly between ties."""
    b = n.b
    keep, axes = n.attr("keepdims", 1), (n.raw(1) if len(n.inputs) > 1 else None)
    mask = b.Cast(b.Equal(n.x(0), _kept(n, n.y(), keep, axes)), to=1)
    count = b.ReduceSum(mask, *([axes] if axes is not None else []), keepdims=1)
    return (lambda: b.Mul(_reduce(n, g), b.Div(mask, count)),)


def _gelu_derivative(n):
    b, x = n.b, n.x(0)
    if n.attr("approximate", "none") == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = b.Mul(b.f32(c), b.Add(x, b.Mul(b.f32(0.044715), b.Mul(x, b.Mul(x, x)))))
        t = b.Tanh(inner)
        d_inner = b.Mul(b.f32(c), b.Add(b.f32(1.0), b.Mul(b.f32(3 * 0.044715), b.Mul(x, x))))
        return b.Add(b.Mul(b.f32(0.5), b.Add(b.f32(1.0), t)),
                     b.Mul(b.Mul(b.f32(0.5), x), b.Mul(b.Sub(b.f32(1.0), b.Mul(t, t)), d_inner)))
    cdf = b.Mul(b.f32(0.5), b.Add(b.f32(1.0), b.Erf(b.Mul(x, b.f32(1 / math.sqrt(2))))))
    pdf = b.Mul(b.f32(1 / math.sqrt(2 * math.pi)), b.Exp(b.Mul(b.f32(-0.5), b.Mul(x, x))))
    return b.Add(cdf, b.Mul(x, pdf))


def _mish_derivative(n):
    b, x = n.b, n.x(0)
    t = b.Tanh(b.Softplus(x))
    return b.Add(t, b.Mul(b.Mul(x, b.Sigmoid(x)), b.Sub(b.f32(1.0), b.Mul(t, t))))


def _elu_derivative(n):
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(1.0), b.Add(n.y(), b.f32(alpha)))


def _hard_sigmoid_derivative(n):
    b, x = n.b, n.x(0)
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    z = b.Add(b.Mul(x, b.f32(alpha)), b.f32(beta))
    inside = b.And(b.Greater(z, b.f32(0.0)), b.Less(z, b.f32(1.0)))
    return b.Mul(b.Cast(inside, to=1), b.f32(alpha))


# ---- the table ---------------------------------------------------------------------------------
# One row per op type: the exact VJP.

VJP = {
    # structural and linear
    "Identity": lambda n, g: _same(g), "Cast": lambda n, g: _same(g), "CastLike": lambda n, g: (lambda: g, None),
    "Dropout": lambda n, g: _same(g),
    "Add": lambda n, g: (lambda: g, lambda: g),
    "Sub": lambda n, g: (lambda: g, lambda: n.b.Neg(g)),
    "Sum": lambda n, g: tuple((lambda: g) for _ in n.inputs),
    "Neg": lambda n, g: (lambda: n.b.Neg(g),),
    "Mul": lambda n, g: (lambda: n.b.Mul(g, n.x(1)), lambda: n.b.Mul(g, n.x(0))),
    "Div": lambda n, g: (lambda: n.b.Div(g, n.x(1)), lambda: n.b.Neg(n.b.Div(n.b.Mul(g, n.y()), n.x(1)))),
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "Einsum": _einsum,
    "Reshape": _reshape_back, "Flatten": _reshape_back, "Squeeze": _reshape_back, "Unsqueeze": _reshape_back,
    "Expand": lambda n, g: (lambda: g, None),
    "Transpose": lambda n, g: (lambda: n.b.Transpose(g, perm=list(np.argsort(n.attr("perm")))) if n.attr("perm")
                               else n.b.Transpose(g),),
    "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd, "Where": _where,
    "Trilu": lambda n, g: (lambda: n.b.Trilu(g, n.raw(1) if len(n.inputs) > 1 else None, upper=n.attr("upper", 1)),),
    # reductions
    "ReduceSum": lambda n, g: (lambda: _reduce(n, g),),
    "ReduceMean": lambda n, g: (lambda: _reduce(n, g, _mean_scale),),
    "ReduceL2": lambda n, g: (lambda: n.b.Div(n.b.Mul(_reduce(n, g), n.x(0)),
                                              _kept(n, n.y(), n.attr("keepdims", 1), n.raw(1) if len(n.inputs) > 1 else None)),),
    "ReduceSumSquare": lambda n, g: (lambda: n.b.Mul(_reduce(n, g), n.b.Mul(n.b.f32(2.0), n.x(0))),),
    "ReduceMax": _reduce_extremum, "ReduceMin": _reduce_extremum,
    "Max": _extremum, "Min": _extremum,
    # normalisations
    "Softmax": _softmax, "LogSoftmax": _log_softmax, "LayerNormalization": _layer_norm,
    "LpNormalization": _lp_norm,
    # pointwise
    "Pow": _pow,
    "Sqrt": _pointwise(lambda n: n.b.Div(n.b.f32(0.5), n.y())),
    "Reciprocal": _pointwise(lambda n: n.b.Neg(n.b.Mul(n.y(), n.y()))),
    "Exp": _pointwise(lambda n: n.y()),
    "Log": _pointwise(lambda n: n.b.Reciprocal(n.x(0))),
    "Tanh": _pointwise(lambda n: n.b.Sub(n.b.f32(1.0), n.b.Mul(n.y(), n.y()))),
    "Sigmoid": _pointwise(lambda n: n.b.Mul(n.y(), n.b.Sub(n.b.f32(1.0), n.y()))),
    "Relu": _pointwise(lambda n: n.b.Cast(n.b.Greater(n.x(0), n.b.f32(0.0)), to=1)),
    "LeakyRelu": _pointwise(lambda n: n.b.Where(n.b.Greater(n.x(0), n.b.f32(0.0)), n.b.f32(1.0),
                                                n.b.f32(n.attr("alpha", 0.01)))),
    "Elu": _pointwise(_elu_derivative),
    "HardSigmoid": _pointwise(_hard_sigmoid_derivative),
    "Erf": _pointwise(lambda n: n.b.Mul(n.b.f32(2 / math.sqrt(math.pi)), n.b.Exp(n.b.Neg(n.b.Mul(n.x(0), n.x(0)))))),
    "Gelu": _pointwise(_gelu_derivative),
    "Softplus": _pointwise(lambda n: n.b.Sigmoid(n.x(0))),
    "Mish": _pointwise(_mish_derivative),
    "Abs": _pointwise(lambda n: n.b.Sign(n.x(0))),
    "Sin": _pointwise(lambda n: n.b.Cos(n.x(0))),
    "Cos": _pointwise(lambda n: n.b.Neg(n.b.Sin(n.x(0)))),
    "Clip": _clip,
}


# ---- AttnLRP rules, assigned to single nodes by the passes (lrpc.passes) -------------------------

def _uniform(n, g):
    """Bilinear product of two relevance-carrying operands, uniform rule (Prop. 3.2/3.3): ½ of each VJP."""
    return VJP[n.node.op_type](n, n.b.Mul(g, n.b.f32(0.5)))


def _frozen(n, g, frozen: int):
    """One operand is a normalisation statistic (identity rule on it, Prop. 3.4): a constant for ĝ."""
    return tuple(None if i == frozen else t for i, t in enumerate(VJP[n.node.op_type](n, g)))


def _layer_norm_frozen_std(n, g):
    """LayerNormalization with σ frozen (Prop. 3.4): ĝ_x = (h − mean h)/σ, h = ĝ_y ⊙ w."""
    return (lambda: layer_norm_grad(n, g, frozen_std=True), None, None)


def _identity_region(n, g, input: str):
    """Elementwise region u → v, identity rule (Eq. 9): ĝ_u = ĝ_v ⊙ v / (u + ε·sign(u)), sign(0) = 1.

    When the region ends in v = u ⊙ s (SiLU u·σ(u), GELU u·Φ(u), …), v/u is s itself: ĝ_u = ĝ_v ⊙ s is the
    rule without the division (R_u = u·ĝ_v·s = R_v exactly; it differs from the stabilised quotient only
    where |u| is within a few ε·2²⁴ of 0, by a relative ε/|u|), and it reads a tensor the forward made."""
    b, u = n.b, n.value(input)
    factor = _cofactor(n, u)
    if factor is not None:
        return {u: lambda: b.Mul(g, n.f32(factor))}
    return {u: lambda: b.Mul(g, b.Div(n.y(), _stabilised(b, n.f32(u), ACTIVATION_EPS)))}


def _cofactor(n, u):
    """s when the region's output node is v = u ⊙ s (either operand order) and v is shaped like u."""
    node, v = n.node, n.raw_out(0)
    if node.op_type != "Mul" or u not in node.inputs or u.shape is None or v.shape is None \
            or u.shape.rank() != v.shape.rank() or not all(map(same_dim, u.shape, v.shape)):
        return None
    return node.inputs[1] if node.inputs[0] is u else node.inputs[0]


def _no_relevance(n, g):
    """CP-LRP: the tensor is treated as a constant; nothing flows into this node."""
    return ()


LRP_RULES = {
    "uniform": _uniform,
    "frozen": _frozen,
    "layernorm-frozen-std": _layer_norm_frozen_std,
    "identity": _identity_region,
    "none": _no_relevance,
    "gated": _frozen,   # CP-LRP gating product: the activation-side operand takes none
}


def _softmax_rule(n, g):
    """AttnLRP softmax rule (Prop. 3.1): in Gradient×Input form it is the exact VJP."""
    return _softmax(n, g)


def _rms_norm_frozen(n, g):
    """RMSNormalization with the rms frozen (Prop. 3.4): ĝ_x = ĝ_y ⊙ w / rms(x)."""
    b, r, axis = n.b, n.rank(0), n.attr("axis", -1)
    axes = b.i64(list(range(axis, r)) if axis >= 0 else list(range(axis, 0)))
    x = n.x(0)
    rms = b.Sqrt(b.Add(b.ReduceMean(b.Mul(x, x), axes, keepdims=1), b.f32(n.attr("epsilon", 1e-5))))
    return (lambda: b.Div(b.Mul(g, n.x(1)), rms), None)


def _lp_norm_frozen(n, g):
    """LpNormalization with the norm frozen (Prop. 3.4): ĝ_x = ĝ_y / ‖x‖."""
    b = n.b
    return (lambda: b.Div(g, b.ReduceL2(n.x(0), b.i64([n.attr("axis", -1)]), keepdims=1)),)


def _layer(n, name: str):
    """The linear layer node a rule record refers to (the node itself, or the MatMul before its bias Add)."""
    from lrpc.emitter import Local
    if n.node.name == name:
        return n
    return Local(n.em, n.em.nodes[name], [None])


def _stabilised(b, z, eps: float):
    """z + ε·sign(z), sign(0) = 1. Written as z + (2ε·[z ≥ 0] − ε), bit-identical to a Where on the sign but
    elementwise arithmetic only (onnxruntime's broadcasting Where is several times slower on CPU)."""
    step = b.Cast(b.GreaterOrEqual(z, b.f32(0.0)), to=1)
    return b.Add(z, b.Sub(b.Mul(step, b.f32(2 * np.float32(eps))), b.f32(eps)))


def _linear_epsilon(n, g, epsilon: float, layer: str):
    """ε-rule (Eq. 8): ĝ_x = Wᵀ (ĝ_z ⊙ z / (z + ε·sign z)), z the layer's output including its bias."""
    b, z = n.b, n.y()
    layer_node = _layer(n, layer)
    scaled = b.Mul(g, b.Div(z, _stabilised(b, z, epsilon)))
    return {layer_node.raw(0): VJP[layer_node.node.op_type](layer_node, scaled)[0]}


def _linear_gamma(n, g, gamma: float, layer: str):
    """γ-rule: ĝ_x = W_γᵀ (ĝ_z ⊙ z / stab(z_γ)), W_γ = W + γ·W⁺ and b_γ = b + γ·b⁺ folded at compile time,
    z_γ = x W_γ + b_γ."""
    from lrpc.emitter import Local
    b = n.b
    layer_node = _layer(n, layer)
    node = layer_node.node

    def boosted(value):
        array = const_array(value)
        if array is None:
            raise LrpcError(f"node '{node.name}' ({node.op_type}): the γ-rule needs constant weights")
        array = array.astype(np.float32)
        return b.const(array + gamma * np.maximum(array, 0), hint="gamma_weight")
    inputs = [layer_node.x(0)] + [None if v is None else boosted(v) for v in node.inputs[1:]]
    z_gamma = b.op(node.op_type, *inputs, **{k: a.value for k, a in node.attributes.items()})
    boosted_layer = Local(n.em, z_gamma.producer(), [None])
    if n.node is not node:  # the bias Add after a MatMul
        bias = n.raw(1) if n.raw(0) is node.outputs[0] else n.raw(0)
        z_gamma = b.Add(z_gamma, boosted(bias))
    scaled = b.Mul(g, b.Div(n.y(), _stabilised(b, z_gamma, 1e-6)))
    return {layer_node.raw(0): VJP[node.op_type](boosted_layer, scaled)[0]}


LRP_RULES.update({
    "softmax": _softmax_rule,
    "rmsnorm-frozen-rms": _rms_norm_frozen,
    "lpnorm-frozen-norm": _lp_norm_frozen,
    "epsilon": _linear_epsilon,
    "gamma": _linear_gamma,
})


from lrpc import vjp_more  # noqa: E402  (rows for more ops, issue 18; moved into the op registry at merge)
VJP.update(vjp_more.ROWS)
