"""Exact VJPs for ops that had no rule (issue 18), in the row form of `rules.VJP`: fn(n, g) → one thunk per
input (None where nothing flows: indices, shapes, integer masks). Each is verified against finite
differences by ONNX's node tests (tests/conformance.py). `CLASSES` says how the rule-assignment passes must
see each op (elementwise, nonlinear, broadcasting), for the op registry to take over."""

from __future__ import annotations

import numpy as np

from lrpc.errors import LrpcError


def _refuse(n, why: str):
    raise LrpcError(f"node '{n.node.name}' ({n.node.op_type}): {why}")


def _pointwise(derivative):
    """y = f(x): ĝ_x = ĝ_y ⊙ f'(x)."""
    return lambda n, g: (lambda: n.b.Mul(g, derivative(n)),)


def _step(n, condition):
    """A 0/1 float mask from a boolean condition."""
    return n.b.Cast(condition, to=1)


def _one_minus_square(n, v):
    return n.b.Sub(n.b.f32(1.0), n.b.Mul(v, v))


# ---- pointwise ----------------------------------------------------------------------------------

def _selu(n):
    b, x = n.b, n.x(0)
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    negative = b.Mul(b.f32(alpha * gamma), b.Exp(b.Min(x, b.f32(0.0))))   # Min: no overflow on the unused side
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(gamma), negative)


def _celu(n):
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    return b.Where(b.Greater(x, b.f32(0.0)), b.f32(1.0), b.Exp(b.Div(b.Min(x, b.f32(0.0)), b.f32(alpha))))


def _softsign(n):
    b = n.b
    d = b.Add(b.f32(1.0), b.Abs(n.x(0)))
    return b.Reciprocal(b.Mul(d, d))


def _hard_swish(n):
    """y = x·max(0, min(1, x/6 + ½)): y' = 0 below −3, 1 above 3, x/3 + ½ between."""
    b, x = n.b, n.x(0)
    inside = b.Add(b.Div(x, b.f32(3.0)), b.f32(0.5))
    return b.Where(b.Less(x, b.f32(-3.0)), b.f32(0.0), b.Where(b.Greater(x, b.f32(3.0)), b.f32(1.0), inside))


def _swish(n):
    """y = x·σ(αx): y' = σ + αx·σ(1 − σ)."""
    b, x, alpha = n.b, n.x(0), n.attr("alpha", 1.0)
    s = b.Sigmoid(b.Mul(x, b.f32(alpha)))
    return b.Add(s, b.Mul(b.Mul(b.f32(alpha), x), b.Mul(s, b.Sub(b.f32(1.0), s))))


def _prelu(n, g):
    """y = x where x > 0, else slope·x."""
    b = n.b
    positive = n.cached("positive", lambda: b.Greater(n.x(0), b.f32(0.0)))
    return (lambda: b.Mul(g, b.Where(positive(), b.f32(1.0), n.x(1))),
            lambda: b.Mul(g, b.Where(positive(), b.f32(0.0), n.x(0))))


def _mean(n, g):
    scaled = n.cached("scaled", lambda: n.b.Mul(g, n.b.f32(1.0 / len(n.inputs))))
    return tuple((lambda: scaled()) for _ in n.inputs)


POINTWISE = {
    "Selu": _selu, "Celu": _celu, "Softsign": _softsign, "HardSwish": _hard_swish, "Swish": _swish,
    "ThresholdedRelu": lambda n: _step(n, n.b.Greater(n.x(0), n.b.f32(n.attr("alpha", 1.0)))),
    "Sinh": lambda n: n.b.Cosh(n.x(0)),
    "Cosh": lambda n: n.b.Sinh(n.x(0)),
    "Tan": lambda n: n.b.Add(n.b.f32(1.0), n.b.Mul(n.y(), n.y())),
    "Asin": lambda n: n.b.Reciprocal(n.b.Sqrt(_one_minus_square(n, n.x(0)))),
    "Acos": lambda n: n.b.Neg(n.b.Reciprocal(n.b.Sqrt(_one_minus_square(n, n.x(0))))),
    "Atan": lambda n: n.b.Reciprocal(n.b.Add(n.b.f32(1.0), n.b.Mul(n.x(0), n.x(0)))),
    "Asinh": lambda n: n.b.Reciprocal(n.b.Sqrt(n.b.Add(n.b.Mul(n.x(0), n.x(0)), n.b.f32(1.0)))),
    "Acosh": lambda n: n.b.Reciprocal(n.b.Sqrt(n.b.Sub(n.b.Mul(n.x(0), n.x(0)), n.b.f32(1.0)))),
    "Atanh": lambda n: n.b.Reciprocal(_one_minus_square(n, n.x(0))),
}


# ---- reductions ---------------------------------------------------------------------------------

def _axes(n):
    """The reduced axes as an int64 tensor (None: all), from the input (opset ≥ 18) or the attribute."""
    if len(n.inputs) > 1 and n.inputs[1] is not None:
        return n.b.Cast(n.raw(1), to=7)
    axes = n.attr("axes")
    return n.b.i64(list(axes)) if axes else None


def _kept(n, value, axes):
    """A reduction output (or its ĝ) shaped to broadcast against the input (the keepdims=1 form)."""
    if n.attr("keepdims", 1):
        return value
    if axes is None:  # all axes reduced to a scalar: a scalar broadcasts already
        return value
    return n.b.Unsqueeze(value, axes)


def _reduction(local_derivative):
    """ĝ_x = broadcast(ĝ_y) ⊙ ∂y/∂x, with ∂y/∂x written from x and y kept-dims shaped."""
    def row(n, g):
        if n.attr("noop_with_empty_axes", 0) and (len(n.inputs) < 2 or n.inputs[1] is None):
            return (lambda: g,)   # no axes: the identity

        def grad():
            axes = _axes(n)
            spread = n.b.Expand(_kept(n, g, axes), n.b.Shape(n.raw(0)))
            return n.b.Mul(spread, local_derivative(n, n.x(0), _kept(n, n.y(), axes)))
        return (grad,)
    return row


REDUCTIONS = {
    "ReduceL1": _reduction(lambda n, x, y: n.b.Sign(x)),
    # y = log Σ exp x: ∂y/∂x = exp(x − y), finite where y is (no exp of a large x on its own)
    "ReduceLogSumExp": _reduction(lambda n, x, y: n.b.Exp(n.b.Sub(x, y))),
    # y = log Σ x: ∂y/∂x = 1 / Σ x = exp(−y)
    "ReduceLogSum": _reduction(lambda n, x, y: n.b.Exp(n.b.Neg(y))),
}


# ---- pooling ------------------------------------------------------------------------------------

def _global_average_pool(n, g):
    b = n.b
    count = lambda: b.Div(b.Cast(b.Size(n.raw_out(0)), to=1), b.Cast(b.Size(n.raw(0)), to=1))  # noqa: E731
    return (lambda: b.Mul(b.Expand(g, b.Shape(n.raw(0))), count()),)


def _global_max_pool(n, g):
    """ĝ goes to the maximum of each channel, split evenly between ties."""
    b = n.b

    def grad():
        x = n.x(0)
        mask = b.Cast(b.Equal(x, n.y()), to=1)
        spatial = b.Range(b.i64(2), b.Cast(b.Size(b.Shape(n.raw(0))), to=7), b.i64(1))
        return b.Mul(b.Expand(g, b.Shape(n.raw(0))), b.Div(mask, b.ReduceSum(mask, spatial, keepdims=1)))
    return (grad,)


def _pool_geometry(n):
    """(kernel, strides, pads, dilations) of a pooling node, auto_pad SAME_* written as explicit pads."""
    if n.attr("ceil_mode", 0):
        _refuse(n, "ceil_mode=1 is not supported")
    kernel = list(n.attr("kernel_shape"))
    k = len(kernel)
    strides, dilations = list(n.attr("strides") or [1] * k), list(n.attr("dilations") or [1] * k)
    pads, auto_pad = list(n.attr("pads") or [0] * (2 * k)), n.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = n.dims(0)
        if dims is None or not all(isinstance(d, int) for d in dims[2:]):
            _refuse(n, f"auto_pad={auto_pad} needs static spatial dims")
        total = [max((-(-d // s) - 1) * s + (kk - 1) * dl + 1 - d, 0)
                 for d, s, kk, dl in zip(dims[2:], strides, kernel, dilations)]
        small = [t // 2 for t in total]   # SAME_UPPER puts the odd one at the end
        pads = (small + [t - h for t, h in zip(total, small)]) if auto_pad == "SAME_UPPER" else \
            ([t - h for t, h in zip(total, small)] + small)
    elif auto_pad not in ("NOTSET", "VALID"):
        _refuse(n, f"auto_pad={auto_pad} is not supported")
    return kernel, strides, pads, dilations


def _max_pool(n, g):
    """ĝ_x scatter-adds ĝ_y to the argmax of each window (MaxPool's own Indices output, row-major)."""
    b = n.b
    kernel, strides, pads, dilations = _pool_geometry(n)
    if n.attr("storage_order", 0):
        _refuse(n, "storage_order=1 is not supported")

    def grad():
        _, indices = b.MaxPool(n.x(0), kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                               _outputs=2)
        flat = b.i64([-1])
        zeros = n.zeros_like(b.Shape(b.Reshape(n.raw(0), flat)))
        scattered = b.ScatterElements(zeros, b.Reshape(indices, flat), b.Reshape(g, flat), axis=0,
                                      reduction="add")
        return b.Reshape(scattered, b.Shape(n.raw(0)))
    return (grad,)


def _pool_transpose_shape(n, kernel, strides, pads, dilations):
    """(channels, output_padding) for the ConvTranspose that spreads a pooling's ĝ back to its input size."""
    dims = n.dims(0)
    if dims is None or not all(isinstance(d, int) for d in dims[1:]):
        _refuse(n, "channels and spatial dims must be static")
    k = len(kernel)
    out_dims = [(d + pads[i] + pads[i + k] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                for i, d in enumerate(dims[2:])]
    full = [(o - 1) * strides[i] - pads[i] - pads[i + k] + dilations[i] * (kernel[i] - 1) + 1
            for i, o in enumerate(out_dims)]
    return dims[1], [s - f for s, f in zip(dims[2:], full)]


def _average_pool(n, g):
    """ĝ_x = ConvTranspose(ĝ_y / count, ones) per channel, count the elements each window averaged."""
    b = n.b
    kernel, strides, pads, dilations = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)
    spatial = n.dims(0)[2:]
    ones = b.f32(np.ones([channels, 1] + kernel, np.float32))
    geometry = dict(strides=strides, pads=pads, dilations=dilations)

    def grad():
        if n.attr("count_include_pad", 0):
            count = b.f32(float(np.prod(kernel)))
        else:  # the elements inside the input under each window: a convolution of ones by ones
            count = b.Conv(b.f32(np.ones([1, 1] + spatial, np.float32)), b.f32(np.ones([1, 1] + kernel, np.float32)),
                           **geometry)
        return b.ConvTranspose(b.Div(g, count), ones, group=channels,
                               output_padding=extra if any(extra) else None, **geometry)
    return (grad,)


# ---- normalisations -----------------------------------------------------------------------------

def _channel_shape(n, rank):
    """Reshape target [C, 1, …, 1] so a per-channel vector broadcasts against [N, C, spatial…]."""
    return n.b.i64([-1] + [1] * (rank - 2))


def _batch_norm(n, g):
    """Inference BatchNormalization: y = (x − mean)/√(var + ε)·scale + B, per channel (axis 1)."""
    b, r = n.b, n.rank(0)
    if r is None:
        _refuse(n, "input rank unknown")
    if n.attr("training_mode", 0):
        _refuse(n, "training_mode=1 is not supported; export the model in inference mode")
    eps = n.attr("epsilon", 1e-5)
    per_channel = lambda v: b.Reshape(v, _channel_shape(n, r))  # noqa: E731
    others = b.i64([0] + list(range(2, r)))
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


def _grouped_norm(groups):
    """InstanceNormalization (groups=None: each channel its own group) and GroupNormalization: statistics over
    each group of channels and the spatial dims, then a per-channel scale and bias."""
    def row(n, g):
        b, r = n.b, n.rank(0)
        if r is None:
            _refuse(n, "input rank unknown")
        eps = n.attr("epsilon", 1e-5)
        grouped = b.i64([0, 0 if groups is None else n.attr(groups), -1])
        stats = n.cached("stats", lambda: _group_stats_grad(n, g, n.x(0), grouped, _channel_shape(n, r), n.x(1), eps))
        others = b.i64([0] + list(range(2, r)))
        x_hat = lambda: b.Reshape(stats()[1], b.Shape(n.raw(0)))  # noqa: E731
        return (lambda: b.Reshape(stats()[0], b.Shape(n.raw(0))),
                lambda: b.ReduceSum(b.Mul(g, x_hat()), others, keepdims=0),
                lambda: b.ReduceSum(g, others, keepdims=0))
    return row


def _nll_grad(n, g):
    """ĝ of the scores of y = −w[t]·scores[n, t, …] per element (0 where t is ignore_index), summed, or
    averaged over Σ w[t]: −ĝ·w[t] (÷ Σ w[t] for the mean) at the target class, 0 elsewhere."""
    b, reduction, ignore = n.b, n.attr("reduction", "mean"), n.attr("ignore_index")
    target = n.raw(1)
    keep = b.f32(1.0) if ignore is None else b.Cast(b.Not(b.Equal(target, b.i64(ignore))), to=1)
    safe = target if ignore is None else b.Where(b.Equal(target, b.i64(ignore)), b.i64(0), target)
    weight = b.Mul(keep, b.Gather(n.x(2), safe)) if len(n.inputs) > 2 and n.inputs[2] is not None else keep
    per_element = g if reduction == "none" else b.Expand(g, b.Shape(target))
    if reduction == "mean":
        per_element = b.Div(per_element, b.ReduceSum(b.Expand(weight, b.Shape(target)), keepdims=0))
    onehot = b.OneHot(safe, b.Shape(n.raw(0), start=1, end=2), b.f32([0.0, 1.0]), axis=1)
    return b.Neg(b.Mul(onehot, b.Unsqueeze(b.Mul(per_element, weight), b.i64([1]))))


def _weight_refused(n):
    return lambda: _refuse(n, "a class weight that carries relevance is not supported")


def _nll_loss(n, g):
    return (lambda: _nll_grad(n, g), None, _weight_refused(n))


def _softmax_cross_entropy(n, g):
    """loss = NLL(log_softmax(x, axis 1)), log_prob its second output: ĝ_x = h − softmax·Σ_c h, with h the
    ĝ of log_prob (from the loss and from the output itself)."""
    b = n.b

    def grad():
        h = _nll_grad(n, n.grads[0]) if n.grads[0] is not None else None
        if len(n.grads) > 1 and n.grads[1] is not None:
            h = n.grads[1] if h is None else b.Add(h, n.grads[1])
        softmax = b.Softmax(n.x(0), axis=1)
        return b.Sub(h, b.Mul(softmax, b.ReduceSum(h, b.i64([1]), keepdims=1)))
    return (grad, None, _weight_refused(n))


# ---- structural ---------------------------------------------------------------------------------

def _cumsum(n, g):
    """The transpose of a (reverse, exclusive) running sum is the running sum the other way."""
    return (lambda: n.b.CumSum(g, n.raw(1), exclusive=n.attr("exclusive", 0), reverse=1 - n.attr("reverse", 0)),
            None)


def _scatter_elements(n, g):
    """data's ĝ is ĝ_y with the overwritten positions zeroed (all of ĝ_y with reduction=add);
    the updates' ĝ is ĝ_y read at their positions."""
    b, reduction, axis = n.b, n.attr("reduction", "none"), n.attr("axis", 0)
    if reduction not in ("none", "add"):
        _refuse(n, f"reduction={reduction} is not supported")
    data = (lambda: g) if reduction == "add" else \
        (lambda: b.ScatterElements(g, n.raw(1), n.zeros_like(b.Shape(n.raw(2))), axis=axis))
    return (data, None, lambda: b.GatherElements(g, n.raw(1), axis=axis))


def _scatter_nd(n, g):
    b, reduction = n.b, n.attr("reduction", "none")
    if reduction not in ("none", "add"):
        _refuse(n, f"reduction={reduction} is not supported")
    data = (lambda: g) if reduction == "add" else \
        (lambda: b.ScatterND(g, n.raw(1), n.zeros_like(b.Shape(n.raw(2)))))
    return (data, None, lambda: b.GatherND(g, n.raw(1)))


def _tile(n, g):
    """ĝ_x sums ĝ_y over the copies: ĝ_y reshaped to [r₀, d₀, r₁, d₁, …], summed over the r axes."""
    b, r = n.b, n.rank(0)
    if r is None:
        _refuse(n, "input rank unknown")
    if r == 0:
        return (lambda: g, None)

    def grad():
        column = b.i64([-1, 1])
        pairs = b.Concat(b.Reshape(b.Cast(n.raw(1), to=7), column), b.Reshape(b.Shape(n.raw(0)), column), axis=1)
        return b.ReduceSum(b.Reshape(g, b.Reshape(pairs, b.i64([-1]))), b.i64(list(range(0, 2 * r, 2))), keepdims=0)
    return (grad, None)


def _depth_to_space(n, g):
    """DCR: [N, C, H, W] → [N, bs, bs, C/bs², H, W] → (0, 3, 4, 1, 5, 2); CRD: [N, C/bs², bs, bs, H, W] →
    (0, 1, 4, 2, 5, 3); ĝ undoes the permutation and the reshapes."""
    b, bs, dims = n.b, n.attr("blocksize"), n.dims(0)
    if dims is None or not all(isinstance(d, int) for d in dims):
        _refuse(n, "the input's dims must be known at compile time")
    batch, c, h, w = dims
    if n.attr("mode", "DCR") == "DCR":
        inner, perm = [batch, bs, bs, c // (bs * bs), h, w], [0, 3, 4, 1, 5, 2]
    else:
        inner, perm = [batch, c // (bs * bs), bs, bs, h, w], [0, 1, 4, 2, 5, 3]
    permuted = [inner[p] for p in perm]
    return (lambda: b.Reshape(b.Transpose(b.Reshape(g, b.i64(permuted)), perm=list(np.argsort(perm))),
                              b.i64(dims)),)


def _space_to_depth(n, g):
    """[N, C, H, W] → [N, C, H/bs, bs, W/bs, bs] → DCR (0, 3, 5, 1, 2, 4) or CRD (0, 1, 3, 5, 2, 4) →
    [N, C·bs², H/bs, W/bs]; ĝ undoes the permutation and the reshapes."""
    b, bs, dims = n.b, n.attr("blocksize"), n.dims(0)
    if dims is None or not all(isinstance(d, int) for d in dims):
        _refuse(n, "the input's dims must be known at compile time")
    batch, c, h, w = dims
    inner = [batch, c, h // bs, bs, w // bs, bs]
    perm = [0, 3, 5, 1, 2, 4] if n.attr("mode", "DCR") == "DCR" else [0, 1, 3, 5, 2, 4]
    permuted = [inner[p] for p in perm]
    return (lambda: b.Reshape(b.Transpose(b.Reshape(g, b.i64(permuted)), perm=list(np.argsort(perm))),
                              b.i64(dims)),)


def _reduce_prod(n, g):
    """∂y/∂x_i is the product of the other elements: y/x_i without zeros; with one zero only that element's,
    the product of the non-zeros; with two or more, 0 (no division by a zero)."""
    b = n.b

    def grad():
        axes, x = _axes(n), n.x(0)
        reduce = lambda op, v: b.op(op, v, *([axes] if axes is not None else []), keepdims=1)  # noqa: E731
        is_zero = b.Equal(x, b.f32(0.0))
        nonzero = b.Where(is_zero, b.f32(1.0), x)
        product = reduce("ReduceProd", nonzero)        # the product of the non-zeros
        zeros = reduce("ReduceSum", b.Cast(is_zero, to=1))
        others = b.Where(b.Equal(zeros, b.f32(0.0)), b.Div(product, nonzero),
                         b.Where(b.And(is_zero, b.Equal(zeros, b.f32(1.0))), product, b.f32(0.0)))
        return b.Mul(b.Expand(_kept(n, g, axes), b.Shape(n.raw(0))), others)
    return (grad,)


def _lp_pool(n, g):
    """y = (Σ_window |x|^p)^(1/p): ĝ_x = ConvTranspose(ĝ_y ⊙ y^(1−p), ones) ⊙ sign(x)·|x|^(p−1), with 0 where
    a window's y is 0 (every element 0: no direction increases y faster than another)."""
    b, p = n.b, float(n.attr("p", 2))
    kernel, strides, pads, dilations = _pool_geometry(n)
    channels, extra = _pool_transpose_shape(n, kernel, strides, pads, dilations)

    def grad():
        y, x = n.y(), n.x(0)
        safe = b.Where(b.Equal(y, b.f32(0.0)), b.f32(1.0), y)
        scaled = b.Where(b.Equal(y, b.f32(0.0)), b.f32(0.0), b.Mul(g, b.Pow(safe, b.f32(1.0 - p))))
        spread = b.ConvTranspose(scaled, b.f32(np.ones([channels, 1] + kernel, np.float32)), group=channels,
                                 strides=strides, pads=pads, dilations=dilations,
                                 output_padding=extra if any(extra) else None)
        return b.Mul(spread, b.Mul(b.Sign(x), b.Pow(b.Abs(x), b.f32(p - 1.0))))
    return (grad,)


def _mean_variance_norm(n, g):
    """y = (x − E x)/√(E x² − (E x)²) over `axes`: ĝ_x = (h − mean h − y·mean(h·y))/σ, h = ĝ_y."""
    b = n.b

    def grad():
        axes = b.i64(list(n.attr("axes", [0, 2, 3])))
        mean = lambda v: b.ReduceMean(v, axes, keepdims=1)  # noqa: E731
        x = n.x(0)
        centred = b.Sub(x, mean(x))
        inv_std = b.Reciprocal(b.Sqrt(mean(b.Mul(centred, centred))))
        x_hat = b.Mul(centred, inv_std)
        return b.Mul(b.Sub(b.Sub(g, mean(g)), b.Mul(x_hat, mean(b.Mul(g, x_hat)))), inv_std)
    return (grad,)


def _top_k(n, g):
    """The values output: ĝ_x scatters ĝ_values to the indices they were read from (indices: no ĝ)."""
    b = n.b
    axis = n.attr("axis", -1)
    grad_values = n.grads[0]
    if grad_values is None:
        return (None, None)
    return (lambda: b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), n.raw_out(1), grad_values, axis=axis,
                                      reduction="add"), None)


def _max_unpool(n, g):
    """y[indices[j]] = x[j] (flat indices over the whole tensor): ĝ_x = ĝ_y read at the indices."""
    b = n.b
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        _refuse(n, "an explicit output_shape is not supported")
    flat = b.i64([-1])
    return (lambda: b.Reshape(b.Gather(b.Reshape(g, flat), b.Reshape(n.raw(1), flat)), b.Shape(n.raw(0))),
            None, None)


def _pad(n, g):
    """Constant Pad: ĝ_x is ĝ_y padded by the negated amounts (a crop; a negative pad, a crop, comes back as
    zeros); the padding value receives everything ĝ_y has outside x."""
    b, mode = n.b, n.attr("mode", "constant")
    if mode != "constant":
        _refuse(n, f"mode={mode} is not supported")
    axes = n.raw(3) if len(n.inputs) > 3 and n.inputs[3] is not None else None
    grad_x = n.cached("x", lambda: b.Pad(g, b.Neg(b.Cast(n.raw(1), to=7)), None, axes, mode="constant"))
    return (grad_x, None,
            lambda: b.Sub(b.ReduceSum(g, keepdims=0), b.ReduceSum(grad_x(), keepdims=0)), None)


def _dims_along(n, axes):
    """Input 0's dims along `axes` (all when None), read at run time."""
    shape = n.b.Shape(n.raw(0))
    return shape if axes is None else n.b.Gather(shape, n.b.i64(list(axes)))


def _compress(n, g):
    """y = x at the true positions of the condition along `axis` (of the flattened x without it):
    ĝ_x scatters ĝ_y back to those positions."""
    b, axis = n.b, n.attr("axis")

    def grad():
        picked = b.Reshape(b.NonZero(n.raw(1)), b.i64([-1]))
        if axis is None:
            flat = b.i64([-1])
            zeros = n.zeros_like(b.Shape(b.Reshape(n.raw(0), flat)))
            return b.Reshape(b.ScatterElements(zeros, picked, b.Reshape(g, flat), axis=0), b.Shape(n.raw(0)))
        r = n.rank(0)
        if r is None:
            _refuse(n, "input rank unknown")
        a = axis % r
        index = b.Expand(b.Reshape(picked, b.i64([1] * a + [-1] + [1] * (r - a - 1))), b.Shape(g))
        return b.ScatterElements(n.zeros_like(b.Shape(n.raw(0))), index, g, axis=a)
    return (grad, None)


ROWS = {
    **{op: _pointwise(d) for op, d in POINTWISE.items()},
    **REDUCTIONS,
    "PRelu": _prelu, "Mean": _mean,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool,
    "MaxPool": _max_pool, "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm, "InstanceNormalization": _grouped_norm(None),
    "GroupNormalization": _grouped_norm("num_groups"), "NegativeLogLikelihoodLoss": _nll_loss,
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy,
    "CumSum": _cumsum, "ScatterElements": _scatter_elements, "ScatterND": _scatter_nd, "Tile": _tile,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    "ReduceProd": _reduce_prod, "LpPool": _lp_pool, "MeanVarianceNormalization": _mean_variance_norm,
    "TopK": _top_k, "Pad": _pad, "MaxUnpool": _max_unpool, "Compress": _compress,
    # self-transposing: the same op maps ĝ_y back (the centre offsets of a crop and its pad coincide)
    "ReverseSequence": lambda n, g: (lambda: n.b.ReverseSequence(g, n.raw(1), batch_axis=n.attr("batch_axis", 1),
                                                                  time_axis=n.attr("time_axis", 0)), None),
    "CenterCropPad": lambda n, g: (lambda: n.b.CenterCropPad(g, _dims_along(n, n.attr("axes")), axes=n.attr("axes")),
                                   None),
    "Hardmax": lambda n, g: (None,),   # piecewise constant: zero derivative
}

# How the passes must see the new ops (for the op registry; dataflow.py already lists the starred ones).
CLASSES = {
    **{op: "elementwise nonlinear" for op in ("Selu", "Celu", "Softsign", "HardSwish", "Swish", "ThresholdedRelu",
                                              "PRelu", "Sinh", "Cosh", "Tan", "Asin", "Acos", "Atan", "Asinh",
                                              "Acosh", "Atanh")},
    "PRelu": "elementwise nonlinear broadcasting", "Mean": "elementwise broadcasting",
    **{op: "reduction" for op in REDUCTIONS},
}
