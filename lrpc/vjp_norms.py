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
        weighted = _attention_weighted_sum(n)
        if weighted is not None:
            return b.Mul(y, b.Sub(g, weighted))
        # A row whose inputs are all −inf (a fully masked query) is NaN in the forward; a reader other than
        # the attention product (a Where giving such rows zeros) keeps the forward finite and sends them
        # ĝ = 0, which the NaN would turn into NaN: those rows attend to nothing and get ĝ_x = 0.
        p = b.Where(b.IsNaN(y), b.f32(0.0), y)
        weighted = b.ReduceSum(b.Mul(g, p), b.i64([n.grad_axis(n.attr("axis", -1))]), keepdims=1)
        return b.Mul(p, b.Sub(g, weighted))
    return (grad_x,)


def _attention_weighted_sum(n):
    """Σ_j ĝ_y[i, j]·y[i, j] read off the attention output o = y @ v instead of the [.., T, T] scores: with
    ĝ_y = c·ĝ_o·vᵀ (c = ½ under the uniform rule), it is c·Σ_d ĝ_o[i, d]·o[i, d] (as FlashAttention's
    backward does). None unless y's only reader is that product, as its left operand, over the last axis."""
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
    if grad_o is None:
        return None
    b, width = n.b, o.shape[-1]
    products = b.Mul(grad_o, n.f32(o))
    if isinstance(width, int):  # the scaled row sum as one product with a constant column (no extra kernel)
        return b.MatMul(products, b.f32(np.full((width, 1), scale, np.float32)))
    total = b.ReduceSum(products, b.i64([-1]), keepdims=1)
    return total if scale == 1.0 else b.Mul(total, b.f32(scale))


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
        refuse(n, "training_mode=1 is not supported; export the model in inference mode")
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


def _group_stats_grad(n, g, x, groups_shape, affine_shape, scale, eps):
    """ĝ of y = x̂·scale + bias with x̂ normalised over the last axis of x reshaped to `groups_shape`."""
    b = n.b
    grouped = b.Reshape(x, groups_shape)
    axes = b.i64([-1])
    mean = lambda v: b.ReduceMean(v, axes, keepdims=1)  # noqa: E731
    centred = b.Sub(grouped, mean(grouped))
    inv_std = b.Reciprocal(b.Sqrt(b.Add(mean(b.Mul(centred, centred)), b.f32(eps))))
    x_hat = b.Mul(centred, inv_std)
    h = b.Reshape(b.Mul(g, b.Reshape(scale, affine_shape)), groups_shape)
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
        grouped = b.i64([0, 0 if groups is None else n.attr(groups), -1])
        stats = n.cached("stats", lambda: _group_stats_grad(n, g, n.x(0), grouped, _channel_shape(n, r), n.x(1), eps))
        others = b.i64([n.grad_axis(a) for a in [0] + list(range(2, r))])
        x_hat = lambda: b.Reshape(stats()[1], b.Shape(n.raw(0)))  # noqa: E731
        return (lambda: b.Reshape(stats()[0], b.Shape(n.raw(0))),
                lambda: b.ReduceSum(b.Mul(g, x_hat()), others, keepdims=0),
                lambda: b.ReduceSum(g, others, keepdims=0))
    return row


def mean_variance_norm(n, g):
    """y = (x − E x)/√(E x² − (E x)²) over `axes`: ĝ_x = (h − mean h − y·mean(h·y))/σ, h = ĝ_y."""
    b = n.b

    def grad():
        axes = b.i64([n.grad_axis(a) for a in n.attr("axes", [0, 2, 3])])
        mean = lambda v: b.ReduceMean(v, axes, keepdims=1)  # noqa: E731
        x = n.x(0)
        centred = b.Sub(x, mean(x))
        inv_std = b.Reciprocal(b.Sqrt(mean(b.Mul(centred, centred))))
        x_hat = b.Mul(centred, inv_std)
        return b.Mul(b.Sub(b.Sub(g, mean(g)), b.Mul(x_hat, mean(b.Mul(g, x_hat)))), inv_std)
    return (grad,)
