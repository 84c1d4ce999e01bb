"""ONNX's optimizer steps (domain ai.onnx.preview.training: Adagrad, Momentum, Adam) written out in standard
ops, as the operator specification states them (onnx/defs/training/defs.cc). They are differentiable in the
learning rate, the tensors, their gradients and their accumulators; onnxruntime has no kernel for them, so the
node is replaced by its decomposition (lrpc.decompose), which runs everywhere. Inputs: R (learning rate), T
(update count, int64), then n tensors X, n gradients G and n accumulators of each kind the optimizer keeps;
outputs: the new tensors, then the new accumulators."""

from __future__ import annotations

from lrpc.graph import attr

TRAINING = "ai.onnx.preview.training"


def _groups(node, kinds: int):
    """R, T as float, and the n (X, G, accumulators…) groups."""
    count = (len(node.inputs) - 2) // kinds
    columns = [node.inputs[2 + k * count: 2 + (k + 1) * count] for k in range(kinds)]
    return node.inputs[0], node.inputs[1], list(zip(*columns))


def _regularised(b, node, x, g):
    """g + norm_coefficient · x (the gradient of the L2 term added)."""
    return b.Add(b.Mul(b.scalar(float(attr(node, "norm_coefficient", 0.0))), x), g)


def _started(b, t):
    """(T > 0, T as float with 0 read as 1): a branch that only applies after the first step never divides 0/0."""
    started = b.Greater(t, b.i64(0))
    return started, b.CastLike(b.Max(t, b.i64(1)), b.scalar(1.0))


def adagrad(node, b, ctx):
    """r = R / (1 + T·decay_factor); H' = H + g²; X' = X − r·g / (√H' + ε), g regularised."""
    rate, t, groups = _groups(node, 3)
    decay = b.scalar(float(attr(node, "decay_factor", 0.0)))
    rate = b.Div(rate, b.Add(b.scalar(1.0), b.Mul(b.CastLike(t, rate), decay)))
    xs, hs = [], []
    for x, g, h in groups:
        g = _regularised(b, node, x, g)
        h = b.Add(h, b.Mul(g, g))
        step = b.Div(g, b.Add(b.Sqrt(h), b.scalar(float(attr(node, "epsilon", 1e-6)))))
        xs.append(b.Sub(x, b.Mul(rate, step)))
        hs.append(h)
    return xs + hs


def momentum(node, b, ctx):
    """V' = α·V + β·g (β read as 1 at T = 0); X' = X − R·V' (standard) or X − R·(g + α·V') (nesterov)."""
    rate, t, groups = _groups(node, 3)
    alpha, beta = b.scalar(float(attr(node, "alpha"))), b.scalar(float(attr(node, "beta")))
    beta = b.Where(_started(b, t)[0], beta, b.scalar(1.0))
    nesterov = attr(node, "mode", "standard") == "nesterov"
    xs, vs = [], []
    for x, g, v in groups:
        g = _regularised(b, node, x, g)
        v = b.Add(b.Mul(alpha, v), b.Mul(beta, g))
        xs.append(b.Sub(x, b.Mul(rate, b.Add(g, b.Mul(alpha, v)) if nesterov else v)))
        vs.append(v)
    return xs + vs


def adam(node, b, ctx):
    """V' = α·V + (1 − α)·g; H' = β·H + (1 − β)·g²; X' = (1 − post)·(X − r·V' / (√H' + ε)) with
    r = R·√(1 − β^T) / (1 − α^T) after the first step (R at T = 0)."""
    rate, t, groups = _groups(node, 4)
    a, c = float(attr(node, "alpha", 0.9)), float(attr(node, "beta", 0.999))
    started, steps = _started(b, t)
    corrected = b.Div(b.Mul(rate, b.Sqrt(b.Sub(b.scalar(1.0), b.Pow(b.scalar(c), steps)))),
                      b.Sub(b.scalar(1.0), b.Pow(b.scalar(a), steps)))
    rate = b.Where(started, corrected, rate)
    keep = b.scalar(1.0 - float(attr(node, "norm_coefficient_post", 0.0)))
    xs, vs, hs = [], [], []
    for x, g, v, h in groups:
        g = _regularised(b, node, x, g)
        v = b.Add(b.Mul(b.scalar(a), v), b.Mul(b.scalar(1.0 - a), g))
        h = b.Add(b.Mul(b.scalar(c), h), b.Mul(b.scalar(1.0 - c), b.Mul(g, g)))
        step = b.Div(v, b.Add(b.Sqrt(h), b.scalar(float(attr(node, "epsilon", 1e-6)))))
        xs.append(b.Mul(keep, b.Sub(x, b.Mul(rate, step))))
        vs.append(v)
        hs.append(h)
    return xs + vs + hs
