"""VJPs of the normalisations: Softmax, LogSoftmax, LayerNormalization, LpNormalization."""

from __future__ import annotations

import numpy as np

from lrpc.errors import LrpcError
from lrpc.graph import PREFIX, same_dim
from lrpc.plan import Rule
from lrpc.vjp_common import refuse


def softmax(n, g):
    """y = softmax(x): ĝ_x = y ⊙ (ĝ_y − Σ ĝ_y ⊙ y). Equals the AttnLRP softmax rule (Prop. 3.1) times x."""
    b, y = n.b, n.y()

    def grad_x():
        attention = _attention_reader(n)
        if attention is not None:
            return b.Mul(y, _centred_attention_grad(n, g, *attention))
        # A row whose inputs are all −inf (a fully masked query) is NaN in the forward; a reader other than
        # the attention product (a Where giving such rows zeros) keeps the forward finite and sends them
        # ĝ = 0, which the NaN would turn into NaN: those rows attend to nothing and get ĝ_x = 0.
        p = b.Where(b.IsNaN(y), b.f32(0.0), y)
        weighted = b.ReduceSum(b.Mul(g, p), b.i64([n.grad_axis(n.attr("axis", -1))]), keepdims=1)
        return b.Mul(p, b.Sub(g, weighted))
    return (grad_x,)


def _attention_reader(n):
    """(the attention output o = y @ v, v, c, ĝ_o) when y's only reader is that product, as its left operand,
    over the last axis, and its ĝ is ĝ_y = c·ĝ_o·vᵀ (c = ½ under the uniform rule); else None."""
    y = n.raw_out(0)
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
    scale = {None: 1.0, Rule.UNIFORM: 0.5}.get(n.rule_of(product))
    grad_o = n.accumulated(o) if scale is not None else None
    return None if grad_o is None else (o, product.inputs[1], scale, grad_o)


def _centred_attention_grad(n, g, o, v, scale, grad_o):
    """ĝ_y − Σ_j ĝ_y[i, j]·y[i, j] without a pass over the [.., T, T] scores for the row sums: they are
    c·Σ_d ĝ_o[i, d]·o[i, d] (as FlashAttention's backward reads them off the output). On whole rows the
    subtraction goes into the product that makes ĝ_y, one column wider: [ĝ_o, −sums] @ [c·v, 1]ᵀ, so no
    [T, T] tensor is read and written again for it (ĝ_y itself, left unread, is dead code)."""
    b, width = n.b, o.shape[-1]
    products = b.Mul(grad_o, n.f32(o))
    rv = v.shape.rank() if v.shape is not None else None
    if n.compact is not None or rv is None or rv < 2:   # one row: the [1, T] subtraction is cheap
        return b.Add(g, _row_sums(b, products, width, -scale))
    # c goes into the forward's [v, 1] (made once), not into the K-wide ĝ_o: [ĝ_o, −sums] @ [c·v, 1]ᵀ
    # (c is ½ or 1, so either way is exact)
    with_ones = b.Pad(n.f32(v) if scale == 1.0 else b.Mul(n.f32(v), b.f32(scale)),
                      b.i64([0] * (2 * rv - 1) + [1]), b.f32(1.0))   # one column of ones
    left = b.Concat(grad_o, _row_sums(b, products, width, -scale), axis=-1)
    return b.MatMul(left, b.Transpose(with_ones, perm=list(range(rv - 2)) + [rv - 1, rv - 2]))


def _row_sums(b, products, width, scale: float):
    """scale·Σ over the last axis, keeping it: one product with a constant column where the width is static
    (no extra kernel)."""
    if isinstance(width, int):
        return b.MatMul(products, b.f32(np.full((width, 1), scale, np.float32)))
    return b.Mul(b.ReduceSum(products, b.i64([-1]), keepdims=1), b.f32(scale))


def log_softmax(n, g):
    b = n.b
    return (lambda: b.Sub(g, b.Mul(b.Exp(n.y()), b.ReduceSum(g, b.i64([n.grad_axis(n.attr("axis", -1))]), keepdims=1))),)


def layer_norm_grad(n, g, frozen_std: bool):
    """LayerNormalization: y = (x − μ)/σ · w + β over axes [axis, rank). With the std frozen (Prop. 3.4)
    only the centring is differentiated: ĝ_x = (h − mean h)/σ, h = ĝ_y·w; exactly, also − x̂·mean(h·x̂)/σ."""
    b = n.b
    r = n.rank(0)
    axis = n.attr("axis", -1)
    if r is None and axis >= 0:
        raise LrpcError(f"node '{n.node.name}' (LayerNormalization): input rank unknown")
    normalised = list(range(axis, r)) if axis >= 0 else list(range(axis, 0))
    axes = b.i64(normalised)
    grad_axes = b.i64([n.grad_axis(a) for a in normalised]) if n.lead and axis >= 0 else axes  # of ĝ-shaped h
    x = n.x(0)
    mean = lambda v, over=axes: b.ReduceMean(v, over, keepdims=1)  # noqa: E731
    centred = b.Sub(x, mean(x))
    inv_std = b.Reciprocal(b.Sqrt(b.Add(mean(b.Mul(centred, centred)), b.f32(n.attr("epsilon", 1e-5)))))
    h = b.Mul(g, n.x(1))
    grad = b.Sub(h, mean(h, grad_axes))
    if not frozen_std:
        x_hat = b.Mul(centred, inv_std)
        grad = b.Sub(grad, b.Mul(x_hat, mean(b.Mul(h, x_hat), grad_axes)))
    grad = b.Mul(grad, inv_std)
    if frozen_std or all(extra is None for extra in n.grads[1:]):
        return grad
    # the Mean and InvStdDev outputs read downstream: ∂μ/∂x = 1/N, ∂σ⁻¹/∂x = −σ⁻³·(x − μ)/N
    inv_count = b.Div(b.Cast(b.Size(mean(x)), to=1), b.Cast(b.Size(x), to=1))   # 1/N
    # (ĝ of a statistic summed over the normalised axes: it may arrive broadcast to x's shape)
    grad_mean, grad_inv = [None if v is None else b.ReduceSum(v, grad_axes, keepdims=1)
                           for v in (n.grads[1:] + [None])[:2]]
    if grad_mean is not None:
        grad = b.Add(grad, b.Mul(grad_mean, inv_count))
    if grad_inv is not None:
        cube = b.Mul(inv_std, b.Mul(inv_std, inv_std))
        grad = b.Sub(grad, b.Mul(b.Mul(grad_inv, inv_count), b.Mul(cube, centred)))
    return grad


def layer_norm(n, g):
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


def lp_norm(n, g):
    """y = x / ‖x‖_p along axis (p = 1, 2): ĝ_x = (ĝ_y − ∂‖x‖·Σ ĝ_y·y)/‖x‖ with ∂‖x‖ = y (p = 2), sign x (p = 1);
    0 on an all-zero slice, whose output is a constant 0."""
    b, axis = n.b, n.attr("axis", -1)
    y = n.y()
    slope = y if n.attr("p", 2) == 2 else b.Sign(n.x(0))
    return (lambda: divide_by_lp_norm(n, b.Sub(g, b.Mul(slope, b.ReduceSum(b.Mul(g, y), b.i64([n.grad_axis(axis)]),
                                                                                 keepdims=1)))),)


def divide_by_lp_norm(n, grad):
    """grad / ‖x‖_p of an LpNormalization node, 0 where the norm is 0 (the output is a constant 0 there)."""
    b = n.b
    if n.attr("p", 2) not in (1, 2):
        raise LrpcError(f"node '{n.node.name}' (LpNormalization): only p = 1 and p = 2 are supported")
    norm = b.op("ReduceL2" if n.attr("p", 2) == 2 else "ReduceL1", n.x(0), b.i64([n.attr("axis", -1)]), keepdims=1)
    zero = b.Equal(norm, b.f32(0.0))
    return b.Where(zero, b.f32(0.0), b.Div(grad, b.Where(zero, b.f32(1.0), norm)))


def _channel_shape(n, rank):
    """Reshape target [C, 1, …, 1] so a per-channel vector broadcasts against [N, C, spatial…]."""
    return n.b.i64([-1] + [1] * (rank - 2))


def batch_norm(n, g):
    """Inference BatchNormalization: y = (x − mean)/√(var + ε)·scale + B, per channel (axis 1)."""
    b, r = n.b, n.rank(0)
    if r is None:
        refuse(n, "input rank unknown")
    if n.attr("training_mode", 0):
        return _batch_norm_training(n, g, r)
    eps = n.attr("epsilon", 1e-5)
    per_channel = lambda v: b.Reshape(v, _channel_shape(n, r))  # noqa: E731
    others = b.i64([n.grad_axis(a) for a in [0] + list(range(2, r))])
    total = lambda v: b.ReduceSum(v, others, keepdims=0)  # noqa: E731
    inv_std = n.cached("inv_std", lambda: b.Reciprocal(b.Sqrt(b.Add(n.x(4), b.f32(eps)))))
    centred = n.cached("centred", lambda: b.Sub(n.x(0), per_channel(n.x(3))))
    return (lambda: b.Mul(g, per_channel(b.Mul(n.x(1), inv_std()))),
            lambda: total(b.Mul(g, b.Mul(centred(), per_channel(inv_std())))),
            lambda: total(g),
            lambda: b.Neg(b.Mul(total(g), b.Mul(n.x(1), inv_std()))),
            lambda: b.Mul(total(b.Mul(g, centred())),
                          b.Mul(b.Mul(n.x(1), b.f32(-0.5)), b.Mul(inv_std(), b.Mul(inv_std(), inv_std())))))


def _batch_norm_training(n, g, r):
    """Training BatchNormalization: the batch statistics μ, σ² (population) per channel normalise x, and the
    running statistics m·input + (1 − m)·batch are outputs too: ĝ_x = scale·(h − mean h − x̂·mean(h x̂))/σ
    + (1 − m)/M·(ĝ_running_mean + 2(x − μ)·ĝ_running_var), M the elements per channel."""
    b, eps, momentum = n.b, n.attr("epsilon", 1e-5), n.attr("momentum", 0.9)
    forward_axes = b.i64([0] + list(range(2, r)))
    grad_axes = b.i64([n.grad_axis(a) for a in [0] + list(range(2, r))])
    per_channel = lambda v: b.Reshape(v, _channel_shape(n, r))  # noqa: E731
    # a per-channel ĝ ([C], or [K, C]) against ĝ_x ([N, C, …], or [K, N, C, …])
    grad_per_channel = lambda v: b.Reshape(v, b.i64(([0, 1] if n.lead else []) + [-1] + [1] * (r - 2)))  # noqa: E731
    running_mean, running_var = (list(n.grads) + [None] * 3)[1:3]

    def stats():
        x = n.x(0)
        centred = b.Sub(x, b.ReduceMean(x, forward_axes, keepdims=1))
        inv_std = b.Reciprocal(b.Sqrt(b.Add(b.ReduceMean(b.Mul(centred, centred), forward_axes, keepdims=1),
                                            b.f32(eps))))
        count = b.Cast(b.Div(b.Size(n.raw(0)), b.Gather(b.Shape(n.raw(0)), b.i64(1))), to=1)
        return centred, inv_std, b.Mul(centred, inv_std), count
    stats = n.cached("stats", stats)

    def grad_x():
        centred, inv_std, x_hat, count = stats()
        mean = lambda v: b.ReduceMean(v, grad_axes, keepdims=1)  # noqa: E731
        rate = b.Div(b.f32(1.0 - momentum), count)
        terms = []
        if g is not None:
            h = b.Mul(g, per_channel(n.x(1)))
            terms.append(b.Mul(b.Sub(b.Sub(h, mean(h)), b.Mul(x_hat, mean(b.Mul(h, x_hat)))), inv_std))
        if running_mean is not None:
            terms.append(b.Mul(grad_per_channel(running_mean), rate))
        if running_var is not None:
            terms.append(b.Mul(grad_per_channel(running_var), b.Mul(b.Mul(rate, b.f32(2.0)), centred)))
        return terms[0] if len(terms) == 1 else b.Sum(*terms)
    total = lambda v: b.ReduceSum(v, grad_axes, keepdims=0)  # noqa: E731
    carried = lambda grad: None if grad is None else (lambda: b.Mul(grad, b.f32(momentum)))  # noqa: E731
    affine = (None, None) if g is None else (lambda: total(b.Mul(g, stats()[2])), lambda: total(g))
    return (grad_x, *affine, carried(running_mean), carried(running_var))


def _group_stats_grad(n, g, x, groups_shape, affine_shape, scale, eps):
    """ĝ of y = x̂·scale + bias with x̂ normalised over the last axis of x reshaped to `groups_shape` (a
    Reshape target of 0s and −1; ĝ's K axis is kept by one more 0 in front)."""
    b = n.b
    grouped = b.Reshape(x, b.i64(groups_shape))
    axes = b.i64([-1])
    mean = lambda v: b.ReduceMean(v, axes, keepdims=1)  # noqa: E731
    centred = b.Sub(grouped, mean(grouped))
    inv_std = b.Reciprocal(b.Sqrt(b.Add(mean(b.Mul(centred, centred)), b.f32(eps))))
    x_hat = b.Mul(centred, inv_std)
    h = b.Reshape(b.Mul(g, b.Reshape(scale, affine_shape)), b.i64([0] * n.lead + groups_shape))
    grad = b.Mul(b.Sub(b.Sub(h, mean(h)), b.Mul(x_hat, mean(b.Mul(h, x_hat)))), inv_std)
    return grad, x_hat


def grouped_norm(groups):
    """InstanceNormalization (groups=None: each channel its own group) and GroupNormalization: statistics over
    each group of channels and the spatial dims, then a per-channel scale and bias."""
    def row(n, g):
        b, r = n.b, n.rank(0)
        if r is None:
            refuse(n, "input rank unknown")
        eps = n.attr("epsilon", 1e-5)
        grouped = [0, 0 if groups is None else n.attr(groups), -1]
        stats = n.cached("stats", lambda: _group_stats_grad(n, g, n.x(0), grouped, _channel_shape(n, r), n.x(1), eps))
        others = b.i64([n.grad_axis(a) for a in [0] + list(range(2, r))])
        x_hat = lambda: b.Reshape(stats()[1], b.Shape(n.raw(0)))  # noqa: E731
        return (lambda: b.Reshape(stats()[0], n.grad_shape(0)),
                lambda: b.ReduceSum(b.Mul(g, x_hat()), others, keepdims=0),
                lambda: b.ReduceSum(g, others, keepdims=0))
    return row


def mean_variance_norm(n, g):
    """y = (x − E x)/√(E x² − (E x)²) over `axes`: ĝ_x = (h − mean h − y·mean(h·y))/σ, h = ĝ_y."""
    b = n.b

    def grad():
        forward_axes = n.attr("axes", [0, 2, 3])
        grad_axes = b.i64([n.grad_axis(a) for a in forward_axes])   # of ĝ-shaped values (a K axis shifts them)
        mean = lambda v, over=b.i64(list(forward_axes)): b.ReduceMean(v, over, keepdims=1)  # noqa: E731
        x = n.x(0)
        centred = b.Sub(x, mean(x))
        inv_std = b.Reciprocal(b.Sqrt(mean(b.Mul(centred, centred))))
        x_hat = b.Mul(centred, inv_std)
        return b.Mul(b.Sub(b.Sub(g, mean(g, grad_axes)), b.Mul(x_hat, mean(b.Mul(g, x_hat), grad_axes))), inv_std)
    return (grad,)


def lrn(n, g):
    """y = x ⊙ d^−β, d = bias + α/size · Σ_window x² over a window of channels: ĝ_x = ĝ_y ⊙ d^−β −
    (2αβ/size) · x ⊙ Σ_{windows holding x} ĝ_y ⊙ y / d (the same window sum, its pads swapped)."""
    b = n.b
    size, alpha, beta, bias = n.attr("size"), n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2    # channels before and after c in c's window

    def window(v, before, after):
        """Σ over channels c − before … c + after of v [(K,) N, C, …], as one Conv over [·, 1, C, rest]."""
        rest = b.ReduceProd(b.Shape(n.raw(0), start=2), keepdims=1)
        flat = b.Reshape(v, b.Concat(b.i64([-1, 1]), b.Shape(n.raw(0), start=1, end=2), rest, axis=0))
        summed = b.Conv(flat, b.f32(np.ones([1, 1, size, 1], np.float32)), pads=[before, 0, after, 0])
        return b.Reshape(summed, b.Shape(v))

    def grad():
        x = n.x(0)
        d = b.Add(b.f32(bias), b.Mul(b.f32(alpha / size), window(b.Mul(x, x), lo, hi)))
        spread = window(b.Div(b.Mul(g, n.y()), d), hi, lo)
        return b.Sub(b.Mul(g, b.Pow(d, b.f32(-beta))), b.Mul(b.f32(2 * alpha * beta / size), b.Mul(x, spread)))
    return (grad,)
