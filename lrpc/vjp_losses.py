"""VJPs of the loss ops: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss w.r.t. their scores and their class
weight (targets are indices)."""

from __future__ import annotations

from lrpc.vjp_common import refuse, scalar_against


def _nll_grad(n, g):
    """ĝ of the scores of y = −w[t]·scores[n, t, …] per element (0 where t is ignore_index), summed, or
    averaged over Σ w[t]: −ĝ·w[t] (÷ Σ w[t] for the mean) at the target class, 0 elsewhere."""
    b, reduction, target = n.b, n.attr("reduction", "mean"), n.raw(1)
    keep, safe = _targets(n)
    weight = b.Mul(keep, b.Gather(n.x(2), safe)) if len(n.inputs) > 2 and n.inputs[2] is not None else keep
    per_element = _per_element(n, g)
    if reduction == "mean":
        per_element = b.Div(per_element, b.ReduceSum(b.Expand(weight, b.Shape(target)), keepdims=0))
    onehot = b.OneHot(safe, b.Shape(n.raw(0), start=1, end=2), b.f32([0.0, 1.0]), axis=1)   # (a K axis broadcasts)
    return b.Neg(b.Mul(onehot, b.Unsqueeze(b.Mul(per_element, weight), b.i64([n.grad_axis(1)]))))


def _targets(n):
    """(1 where the target is not ignore_index else 0, the target with ignore_index read as class 0)."""
    b, target, ignore = n.b, n.raw(1), n.attr("ignore_index")
    if ignore is None:
        return b.f32(1.0), target
    ignored = b.Equal(target, b.i64(ignore))
    return b.Cast(b.Not(ignored), to=1), b.Where(ignored, b.i64(0), target)


def _per_element(n, g):
    """ĝ of the loss per target element: ĝ itself without reduction, else ĝ spread over the target's shape
    (behind a K axis)."""
    if n.attr("reduction", "mean") == "none":
        return g
    return n.b.Expand(scalar_against(n, g, n.raw(1)), n.b.Shape(n.raw(1)))


def _weight_grad(n, g, scores):
    """ĝ of the class weight w [C] of y = −w[t]·scores[n, t, …] per element (0 where t is ignore_index):
    ĝ_w[c] = Σ over the elements with t = c of ĝ·(−scores_t), for the mean (y = Σ −w[t]·scores_t / Σ w[t])
    ĝ·(−scores_t − y) / Σ w[t]."""
    b, reduction, target = n.b, n.attr("reduction", "mean"), n.raw(1)
    keep, safe = _targets(n)
    picked = b.Squeeze(b.GatherElements(scores, b.Unsqueeze(safe, b.i64([1])), axis=1), b.i64([1]))   # scores_t
    per_element = _per_element(n, g)
    if reduction == "mean":
        total = b.ReduceSum(b.Expand(b.Mul(keep, b.Gather(n.x(2), safe)), b.Shape(target)), keepdims=0)
        factor = b.Div(b.Mul(keep, b.Neg(b.Add(picked, n.y()))), total)
    else:
        factor = b.Mul(keep, b.Neg(picked))
    classes = b.Shape(n.raw(0), start=1, end=2)
    onehot = b.OneHot(safe, classes, b.f32([0.0, 1.0]), axis=-1)                        # [N, d…, C]
    rank = n.rank(1)
    if rank is None:
        refuse(n, "a class weight that carries relevance needs the rank of the target")
    spread = b.Mul(b.Unsqueeze(b.Mul(per_element, factor), b.i64([-1])), onehot)       # [(K,) N, d…, C]
    return b.ReduceSum(spread, b.i64(list(range(n.lead, n.lead + rank))), keepdims=0)   # [(K,) C]


def nll_loss(n, g):
    return (lambda: _nll_grad(n, g), None, lambda: _weight_grad(n, g, n.x(0)))


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
    return (grad, None, lambda: _weight_grad(n, n.grads[0], b.LogSoftmax(n.x(0), axis=1)))
