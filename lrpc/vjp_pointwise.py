"""VJPs of the elementwise ops that are not plain arithmetic, and of the reductions. A `*_derivative` is
f'(x) written in terms of the context n (x = n.x(0), y = n.y()), for vjp_common.pointwise."""

from __future__ import annotations

import math

from lrpc.vjp_common import kept, reduce, reduced_axes, refuse


def power(n, g):
    """y = x^p: ĝ_x = ĝ_y·p·x^(p−1), ĝ_p = ĝ_y·y·ln x where x > 0 (elsewhere y is no real function of p)."""
    b = n.b

    def exponent_grad():
        x = n.x(0)
        return b.Mul(g, b.Where(b.Greater(x, b.f32(0.0)), b.Mul(n.y(), b.Log(x)), b.f32(0.0)))
    p = n.x(1)
    return (lambda: b.Mul(g, b.Mul(p, b.Pow(n.x(0), b.Sub(p, b.f32(1.0))))), exponent_grad)



def clip(n, g):
    """y = min(max(x, lo), hi): ĝ goes to hi where it binds, else to lo where it binds, else to x."""
    b = n.b
    has = lambda i: len(n.inputs) > i and n.inputs[i] is not None  # noqa: E731
    low = n.cached("low", lambda: b.Max(n.x(0), n.x(1)) if has(1) else n.x(0))
    inside = n.cached("inside", lambda: b.Mul(g, b.Cast(b.LessOrEqual(low(), n.x(2)), to=1)) if has(2) else g)
    above_low = lambda: b.Cast(b.GreaterOrEqual(n.x(0), n.x(1)), to=1) if has(1) else b.f32(1.0)  # noqa: E731
    return (lambda: b.Mul(inside(), above_low()),
            lambda: b.Sub(inside(), b.Mul(inside(), above_low())),
            lambda: b.Sub(g, inside()))


def mod(n, g):
    """Float y = a − b·q with q = trunc(a/b) (fmod = 1) or floor(a/b), constant between its jumps:
    ĝ_a = ĝ_y, ĝ_b = −ĝ_y·q."""
    b = n.b

    def quotient():
        ratio = b.Div(n.x(0), n.x(1))
        if not n.attr("fmod", 0):
            return b.Floor(ratio)
        return b.Mul(b.Sign(ratio), b.Floor(b.Abs(ratio)))    # trunc
    return (lambda: g, lambda: b.Neg(b.Mul(g, quotient())))


def dropout(n, g):
    """Inference: the identity. Training mode (a true third input): y = x ⊙ mask / (1 − ratio), with the mask
    this run drew (the node's second output, added to the node when the model does not read it)."""
    b, has = n.b, lambda i: len(n.inputs) > i and n.inputs[i] is not None  # noqa: E731
    if not has(2) or (n.const(2) is not None and not bool(n.const(2))):
        return (lambda: g,)
    if len(n.node.outputs) < 2 or n.raw_out(1) is None:
        refuse(n, "training-mode Dropout without its mask output; export the model in inference mode")

    def grad():
        ratio = n.x(1) if has(1) else b.f32(0.5)
        scale = b.Where(n.raw(2), b.Reciprocal(b.Sub(b.f32(1.0), ratio)), b.f32(1.0))
        return b.Mul(g, b.Mul(n.y(1), scale))
    return (grad,)


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

    def grad():
        axes = reduced_axes(n)
        mask = b.Cast(b.Equal(n.x(0), kept(n, n.y())), to=1)
        count = b.ReduceSum(mask, *([axes] if axes is not None else []), keepdims=1)
        return b.Mul(reduce(n, g), b.Div(mask, count))
    return (grad,)


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


def reduce_l2(n, g):
    """y = √Σx²: ĝ_x = ĝ_y·x/y."""
    return (lambda: n.b.Div(n.b.Mul(reduce(n, g), n.x(0)), kept(n, n.y())),)


def reduce_log_sum_exp(n, g):
    """y = log Σ eˣ: ĝ_x = ĝ_y·e^{x − y} (the softmax weights; no eˣ of a large x on its own)."""
    return (lambda: n.b.Mul(reduce(n, g), n.b.Exp(n.b.Sub(n.x(0), kept(n, n.y())))),)


def reduce_log_sum(n, g):
    """y = log Σ x: ĝ_x = ĝ_y / Σ x = ĝ_y·e^{−y}."""
    return (lambda: n.b.Mul(reduce(n, g), n.b.Exp(n.b.Neg(kept(n, n.y())))),)


def reduce_prod(n, g):
    """∂y/∂x_i is the product of the other elements: y/x_i without zeros; with one zero only that element's,
    the product of the non-zeros; with two or more, 0 (no division by a zero)."""
    b = n.b

    def grad():
        axes, x = reduced_axes(n), n.x(0)
        over = [axes] if axes is not None else []
        is_zero = b.Equal(x, b.f32(0.0))
        nonzero = b.Where(is_zero, b.f32(1.0), x)
        product = b.ReduceProd(nonzero, *over, keepdims=1)        # the product of the non-zeros
        zeros = b.ReduceSum(b.Cast(is_zero, to=1), *over, keepdims=1)
        others = b.Where(b.Equal(zeros, b.f32(0.0)), b.Div(product, nonzero),
                         b.Where(b.And(is_zero, b.Equal(zeros, b.f32(1.0))), product, b.f32(0.0)))
        return b.Mul(reduce(n, g), others)
    return (grad,)


# ---- elementwise functions ----------------------------------------------------------------------------

def swish_derivative(n):
    """y = x·σ(αx): σ + αx·σ(1 − σ)."""
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    s = b.Sigmoid(b.Mul(x, b.f32(alpha)))
    return b.Add(s, b.Mul(b.Mul(b.f32(alpha), x), b.Mul(s, b.Sub(b.f32(1.0), s))))


def _one_minus_square(n):
    return n.b.Sub(n.b.f32(1.0), n.b.Mul(n.x(0), n.x(0)))


def tan_derivative(n):
    return n.b.Add(n.b.f32(1.0), n.b.Mul(n.y(), n.y()))


def asin_derivative(n):
    return n.b.Reciprocal(n.b.Sqrt(_one_minus_square(n)))


def acos_derivative(n):
    return n.b.Neg(asin_derivative(n))


def atan_derivative(n):
    return n.b.Reciprocal(n.b.Add(n.b.f32(1.0), n.b.Mul(n.x(0), n.x(0))))


def asinh_derivative(n):
    return n.b.Reciprocal(n.b.Sqrt(n.b.Add(n.b.Mul(n.x(0), n.x(0)), n.b.f32(1.0))))


def acosh_derivative(n):
    return n.b.Reciprocal(n.b.Sqrt(n.b.Sub(n.b.Mul(n.x(0), n.x(0)), n.b.f32(1.0))))


def atanh_derivative(n):
    return n.b.Reciprocal(_one_minus_square(n))
