"""VJPs of the elementwise ops that are not plain arithmetic, and of the reductions. A `*_derivative` is
f'(x) written in terms of the context n (x = n.x(0), y = n.y()), for vjp_common.pointwise."""

from __future__ import annotations

import math

from lrpc.errors import LrpcError
from lrpc.vjp_common import kept, reduce


def power(n, g):
    b = n.b

    def exponent_grad():
        raise LrpcError(f"node '{n.node.name}' (Pow): an exponent that carries relevance is not supported")
    p = n.x(1)
    return (lambda: b.Mul(g, b.Mul(p, b.Pow(n.x(0), b.Sub(p, b.f32(1.0))))), exponent_grad)



def clip(n, g):
    b = n.b
    x = n.x(0)
    keep = b.f32(1.0)
    if len(n.inputs) > 1 and n.inputs[1] is not None:
        keep = b.Mul(keep, b.Cast(b.GreaterOrEqual(x, n.x(1)), to=1))
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        keep = b.Mul(keep, b.Cast(b.LessOrEqual(x, n.x(2)), to=1))
    return (lambda: b.Mul(g, keep), None, None)


def extremum(n, g):
    """Elementwise Max/Min: the gradient goes to the operand(s) equal to the result, split evenly between
    tied operands (as torch does), so relevance is not counted twice."""
    b = n.b
    masks = n.cached("masks", lambda: [b.Cast(b.Equal(n.x(i), n.y()), to=1) for i in range(len(n.inputs))])
    count = n.cached("count", lambda: masks()[0] if len(n.inputs) == 1 else b.Sum(*masks()))
    return tuple((lambda i=i: b.Mul(g, b.Div(masks()[i], count()))) for i in range(len(n.inputs)))


def reduce_extremum(n, g):
    """ReduceMax/Min: ĝ goes to the element(s) equal to the result, split evenly between ties."""
    b = n.b
    keep, axes = n.attr("keepdims", 1), (n.raw(1) if len(n.inputs) > 1 else None)
    mask = b.Cast(b.Equal(n.x(0), kept(n, n.y(), keep, axes)), to=1)
    count = b.ReduceSum(mask, *([axes] if axes is not None else []), keepdims=1)
    return (lambda: b.Mul(reduce(n, g), b.Div(mask, count)),)


def gelu_derivative(n):
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


def mish_derivative(n):
    b, x = n.b, n.x(0)
    t = b.Tanh(b.Softplus(x))
    return b.Add(t, b.Mul(b.Mul(x, b.Sigmoid(x)), b.Sub(b.f32(1.0), b.Mul(t, t))))


def elu_derivative(n):
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(1.0), b.Add(n.y(), b.f32(alpha)))


def hard_sigmoid_derivative(n):
    b, x = n.b, n.x(0)
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    z = b.Add(b.Mul(x, b.f32(alpha)), b.f32(beta))
    inside = b.And(b.Greater(z, b.f32(0.0)), b.Less(z, b.f32(1.0)))
    return b.Mul(b.Cast(inside, to=1), b.f32(alpha))


def hard_swish_derivative(n):
    """y = x·clip(x/6 + ½, 0, 1): 0 below −3, x/3 + ½ up to 3 (inclusive, as torch), 1 above."""
    b, x = n.b, n.x(0)
    inside = b.Add(b.Mul(x, b.f32(1 / 3)), b.f32(0.5))
    return b.Where(b.Less(x, b.f32(-3.0)), b.f32(0.0), b.Where(b.LessOrEqual(x, b.f32(3.0)), inside, b.f32(1.0)))


def selu_derivative(n):
    """y = γ·x for x > 0, γ·α·(eˣ − 1) else: γ, else y + γ·α."""
    b, x = n.b, n.x(0)
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(gamma), b.Add(n.y(), b.f32(alpha * gamma)))


def celu_derivative(n):
    """y = max(0, x) + min(0, α·(e^{x/α} − 1)): 1 for x > 0, e^{x/α} else."""
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(1.0), b.Exp(b.Div(x, b.f32(alpha))))


def softsign_derivative(n):
    """y = x / (1 + |x|): 1 / (1 + |x|)²."""
    b = n.b
    d = b.Add(b.f32(1.0), b.Abs(n.x(0)))
    return b.Reciprocal(b.Mul(d, d))


def thresholded_relu_derivative(n):
    """y = x for x > α, 0 else."""
    b = n.b
    return b.Cast(b.Greater(n.x(0), b.f32(n.attr("alpha", 1.0))), to=1)


def prelu(n, g):
    """y = x for x > 0, slope·x else (slope broadcast; the emitter sums ĝ_slope back to its shape)."""
    b = n.b
    positive = n.cached("positive", lambda: b.Greater(n.x(0), b.f32(0.0)))
    return (lambda: b.Mul(g, b.Where(positive(), b.f32(1.0), n.x(1))),
            lambda: b.Mul(g, b.Where(positive(), b.f32(0.0), n.x(0))))


def mean(n, g):
    """y = (x₁ + … + x_k)/k: each input gets ĝ/k."""
    share = n.cached("share", lambda: n.b.Mul(g, n.b.f32(1 / len(n.inputs))))
    return tuple((lambda: share()) for _ in n.inputs)


def reduce_l1(n, g):
    """y = Σ|x|: ĝ_x = ĝ_y·sign(x)."""
    return (lambda: n.b.Mul(reduce(n, g), n.b.Sign(n.x(0))),)


def reduce_log_sum_exp(n, g):
    """y = log Σ eˣ: ĝ_x = ĝ_y·e^{x − y} (the softmax weights)."""
    b = n.b
    axes = n.raw(1) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    return (lambda: b.Mul(reduce(n, g), b.Exp(b.Sub(n.x(0), kept(n, n.y(), n.attr("keepdims", 1), axes)))),)

