"""VJPs of the normalisations: Softmax, LogSoftmax, LayerNormalization, LpNormalization."""

from __future__ import annotations

import numpy as np

from lrpc.errors import LrpcError
from lrpc.graph import PREFIX, same_dim
from lrpc.plan import Rule


def softmax(n, g):
    """y = softmax(x): ĝ_x = y ⊙ (ĝ_y − Σ ĝ_y ⊙ y). Equals the AttnLRP softmax rule (Prop. 3.1) times x."""
    b, y = n.b, n.y()

    def grad_x():
        weighted = _attention_weighted_sum(n)
        if weighted is None:
            weighted = b.ReduceSum(b.Mul(g, y), b.i64([n.grad_axis(n.attr("axis", -1))]), keepdims=1)
        return b.Mul(y, b.Sub(g, weighted))
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
    return b.Mul(grad, inv_std)


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
    """y = x / ‖x‖₂ along axis: ĝ_x = (ĝ_y − y·Σ ĝ_y·y)/‖x‖."""
    b = n.b
    if n.attr("p", 2) != 2:
        raise LrpcError(f"node '{n.node.name}' (LpNormalization): only p = 2 is supported")
    axis = n.attr("axis", -1)
    y = n.y()
    norm = b.ReduceL2(n.x(0), b.i64([axis]), keepdims=1)
    return (lambda: b.Div(b.Sub(g, b.Mul(y, b.ReduceSum(b.Mul(g, y), b.i64([n.grad_axis(axis)]), keepdims=1))), norm),)
