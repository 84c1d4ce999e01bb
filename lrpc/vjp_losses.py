"""VJPs of the loss ops: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss w.r.t. their scores (targets are
indices; a class weight that carries relevance is refused)."""

from __future__ import annotations

from lrpc.vjp_common import refuse, scalar_against


def _nll_grad(n, g):
    """ĝ of the scores of y = −w[t]·scores[n, t, …] per element (0 where t is ignore_index), summed, or
    averaged over Σ w[t]: −ĝ·w[t] (÷ Σ w[t] for the mean) at the target class, 0 elsewhere."""
    b, reduction, ignore = n.b, n.attr("reduction", "mean"), n.attr("ignore_index")
    target = n.raw(1)
    keep = b.f32(1.0) if ignore is None else b.Cast(b.Not(b.Equal(target, b.i64(ignore))), to=1)
    safe = target if ignore is None else b.Where(b.Equal(target, b.i64(ignore)), b.i64(0), target)
    weight = b.Mul(keep, b.Gather(n.x(2), safe)) if len(n.inputs) > 2 and n.inputs[2] is not None else keep
    per_element = g if reduction == "none" else b.Expand(scalar_against(n, g, target), b.Shape(target))
    if reduction == "mean":
        per_element = b.Div(per_element, b.ReduceSum(b.Expand(weight, b.Shape(target)), keepdims=0))
    onehot = b.OneHot(safe, b.Shape(n.raw(0), start=1, end=2), b.f32([0.0, 1.0]), axis=1)   # forward-shaped
    return b.Neg(b.Mul(onehot, b.Unsqueeze(b.Mul(per_element, weight), b.i64([n.grad_axis(1)]))))


def _weight_refused(n):
    return lambda: refuse(n, "a class weight that carries relevance is not supported")


def nll_loss(n, g):
    return (lambda: _nll_grad(n, g), None, _weight_refused(n))


def softmax_cross_entropy(n, g):
    """loss = NLL(log_softmax(x, axis 1)), log_prob its second output: ĝ_x = h − softmax·Σ_c h, with h the
    ĝ of log_prob (from the loss and from the output itself)."""
    b = n.b

    def grad():
        h = _nll_grad(n, n.grads[0]) if n.grads[0] is not None else None
        if len(n.grads) > 1 and n.grads[1] is not None:
            h = n.grads[1] if h is None else b.Add(h, n.grads[1])
        softmax = b.Softmax(n.x(0), axis=1)
        return b.Sub(h, b.Mul(softmax, b.ReduceSum(h, b.i64([n.grad_axis(1)]), keepdims=1)))
    return (grad, None, _weight_refused(n))
