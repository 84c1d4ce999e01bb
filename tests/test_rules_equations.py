"""Each AttnLRP rule against the paper's explicit equation, evaluated in numpy on small hand-built graphs.

Achtibat et al., "AttnLRP", ICML 2024 (arXiv 2402.05602). Inputs are float, so the relevance lrpc returns
is R_x = x ⊙ ĝ_x per element; each test builds a graph where the relevance arriving at the rule's output
is known (the explained output itself, or a constant linear readout W, for which R_out,i = y_i W[i, t])
and evaluates the rule's equation in relevance form (or, where the paper states it as a modified
gradient, in that form) in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.presets import Options

F, I64 = TensorProto.FLOAT, TensorProto.INT64
EPS_ACT = 1e-10
TOL = 1e-5  # max|diff| / max|want|; lrpc computes in float32, the equations are evaluated in float64


# ---- helpers ---------------------------------------------------------------------------------------

def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs if isinstance(outputs, list) else [outputs], **attrs)


def build(nodes, inputs, outputs, inits=None, opset=18):
    """inputs / outputs: {name: shape} (float unless the shape is given as ("int64", shape))."""
    def info(name, spec):
        dtype, shape = (I64, spec[1]) if spec and spec[0] == "int64" else (F, spec)
        return helper.make_tensor_value_info(name, dtype, shape)
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.int64 if np.asarray(v).dtype.kind == "i"
                                                else np.float32), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "rule_test", [info(k, v) for k, v in inputs.items()],
                              [info(k, v) for k, v in outputs.items()], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def explain(model, feeds, target, position=None, preset="attnlrp", **options):
    explainer = lrpc.Explainer(lrpc.compile(model, preset=preset, **options))
    result = explainer.explain(feeds, target=target, position=position)
    for name, r in result.relevance.items():
        assert np.all(np.isfinite(r)), f"relevance of {name} has NaN/inf"
    return result


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def rules_of(model, preset="attnlrp", **options):
    plan = lrpc.plan_model(model, preset=preset, options=Options(**options))
    return {n.op_type + ":" + (n.outputs[0].name or ""): r.rule for n, r in plan.records.items()}


def softmax_np(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_rule(x, s, r_out, axis=-1):
    """Prop. 3.1: R_in,i = x_i (R_out,i − s_i Σ_j R_out,j)."""
    return x * (r_out - s * r_out.sum(axis=axis, keepdims=True))


erf = np.vectorize(math.erf)
RNG = np.random.default_rng


# ---- softmax (Prop. 3.1) ---------------------------------------------------------------------------

def test_softmax_rule_at_the_output():
    """Explained output = softmax output: R_out is s_t at the target, 0 elsewhere."""
    model = build([node("Softmax", ["x"], "y", axis=-1)], {"x": ["b", 5]}, {"y": ["b", 5]})
    x = RNG(0).normal(size=(3, 5)).astype(np.float32) * 2
    target = [1, 4, 0]
    res = explain(model, {"x": x}, target)
    s = softmax_np(x.astype(np.float64))
    r_out = np.zeros_like(s)
    r_out[np.arange(3), target] = s[np.arange(3), target]
    assert rel_err(res.relevance["x"], softmax_rule(x, s, r_out)) <= TOL
    assert rules_of(model) == {"Softmax:y": "softmax"}


def test_softmax_rule_through_a_linear_readout():
    """z = softmax(x·c) W: the relevance reaching the softmax output is R_out,i = s_i W[i, t]; the scale by a
    constant c is linear, so R at x equals R at x·c."""
    rng = RNG(1)
    W = rng.normal(size=(6, 4))
    model = build([node("Mul", ["x", "c"], "xs"), node("Softmax", ["xs"], "s", axis=-1),
                   node("MatMul", ["s", "W"], "z")],
                  {"x": ["b", 6]}, {"z": ["b", 4]}, {"W": W, "c": np.array(1.7)})
    x = rng.normal(size=(2, 6)).astype(np.float32)
    target = [2, 3]
    res = explain(model, {"x": x}, target)
    xs = 1.7 * x.astype(np.float64)
    s = softmax_np(xs)
    r_out = s * W[:, target].T
    assert rel_err(res.relevance["x"], softmax_rule(xs, s, r_out)) <= TOL


def test_softmax_rule_along_a_middle_axis():
    """Softmax over axis 1 of [b, n, m], explained at y[b, p, t]: only column t gets relevance."""
    model = build([node("Softmax", ["x"], "y", axis=1)], {"x": ["b", 4, 3]}, {"y": ["b", 4, 3]})
    x = RNG(2).normal(size=(2, 4, 3)).astype(np.float32)
    target, position = [2, 0], [1, 3]
    res = explain(model, {"x": x}, target, position)
    s = softmax_np(x.astype(np.float64), axis=1)
    r_out = np.zeros_like(s)
    for b in range(2):
        r_out[b, position[b], target[b]] = s[b, position[b], target[b]]
    assert rel_err(res.relevance["x"], softmax_rule(x, s, r_out, axis=1)) <= TOL


# ---- uniform rule for bilinear products (Prop. 3.2 / 3.3) -------------------------------------------

def test_uniform_rule_matmul_of_two_inputs():
    """y = a @ c, both attributed: R_a,pk = R_c,kt = ½ a_pk c_kt (each gets half), and R_a + R_c = y_pt."""
    model = build([node("MatMul", ["a", "c"], "y")], {"a": ["b", 3, 4], "c": ["b", 4, 5]}, {"y": ["b", 3, 5]})
    rng = RNG(3)
    a, c = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 4, 5)).astype(np.float32)
    target, position = [4, 1], [0, 2]
    res = explain(model, {"a": a, "c": c}, target, position)
    want_a, want_c = np.zeros_like(a, np.float64), np.zeros_like(c, np.float64)
    for b, (t, p) in enumerate(zip(target, position)):
        terms = a[b, p, :].astype(np.float64) * c[b, :, t]
        want_a[b, p, :], want_c[b, :, t] = 0.5 * terms, 0.5 * terms
    assert rel_err(res.relevance["a"], want_a) <= TOL
    assert rel_err(res.relevance["c"], want_c) <= TOL
    np.testing.assert_allclose(res.conservation(), res.logit, rtol=1e-5, atol=1e-6)
    assert rules_of(model) == {"MatMul:y": "uniform"}


def test_uniform_rule_query_key_product_of_one_input():
    """y = (x Wq)(x Wk)ᵀ: both operands derive from x. The uniform rule gives each path ½, so R_x = ½ x ⊙ ∇y;
    y is homogeneous of degree 2 in x, so Σ R_x = y exactly (Euler)."""
    rng = RNG(4)
    Wq, Wk = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    model = build([node("MatMul", ["x", "Wq"], "q"), node("MatMul", ["x", "Wk"], "k"),
                   node("Transpose", ["k"], "kt", perm=[0, 2, 1]), node("MatMul", ["q", "kt"], "y")],
                  {"x": ["b", "s", 4]}, {"y": ["b", "s", "s"]}, {"Wq": Wq, "Wk": Wk})
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    target, position = [3, 0], [1, 4]
    res = explain(model, {"x": x}, target, position)
    xd = x.astype(np.float64)
    want = np.zeros_like(xd)
    for b, (t, p) in enumerate(zip(target, position)):
        q, k = xd[b] @ Wq, xd[b] @ Wk
        grad = np.zeros((5, 4))
        grad[p] += Wq @ k[t]
        grad[t] += Wk @ q[p]
        want[b] = 0.5 * xd[b] * grad
    assert rel_err(res.relevance["x"], want) <= TOL
    np.testing.assert_allclose(res.conservation(), res.logit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broadcast", [False, True])
def test_uniform_rule_elementwise_gating(broadcast):
    """y = a ⊙ c (a gate times an up projection): R_a = R_c = ½ a c, summed over broadcast axes."""
    c_shape = ["b", 1] if broadcast else ["b", 6]
    model = build([node("Mul", ["a", "c"], "y")], {"a": ["b", 6], "c": c_shape}, {"y": ["b", 6]})
    rng = RNG(5)
    a = rng.normal(size=(2, 6)).astype(np.float32)
    c = rng.normal(size=(2, 1 if broadcast else 6)).astype(np.float32)
    target = [5, 2]
    res = explain(model, {"a": a, "c": c}, target)
    want_a, want_c = np.zeros(a.shape), np.zeros(c.shape)
    for b, t in enumerate(target):
        term = float(a[b, t]) * float(c[b, 0 if broadcast else t])
        want_a[b, t] = 0.5 * term
        want_c[b, 0 if broadcast else t] = 0.5 * term
    assert rel_err(res.relevance["a"], want_a) <= TOL
    assert rel_err(res.relevance["c"], want_c) <= TOL
    np.testing.assert_allclose(res.conservation(), res.logit, rtol=1e-5, atol=1e-6)


# ---- identity rule for elementwise activations (Eq. 9) -----------------------------------------------

def _activation(kind):
    """Nodes computing `act` from `x`, the opset they need, and a float64 numpy f."""
    c = math.sqrt(2 / math.pi)
    if kind == "gelu-op":
        return [node("Gelu", ["x"], "act")], 20, lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if kind == "gelu-erf":   # the exporter's decomposition: x · ½ (1 + erf(x / √2))
        return ([node("Div", ["x", "sqrt2"], "d"), node("Erf", ["d"], "e"), node("Add", ["e", "one"], "e1"),
                 node("Mul", ["x", "e1"], "m"), node("Mul", ["m", "half"], "act")], 18,
                lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))))
    if kind == "gelu-tanh":  # GPT-2's 8-op chain: ½x (1 + tanh(√(2/π)(x + 0.044715 x³)))
        return ([node("Pow", ["x", "three"], "x3"), node("Mul", ["x3", "k"], "kx3"), node("Add", ["x", "kx3"], "in"),
                 node("Mul", ["in", "c"], "cin"), node("Tanh", ["cin"], "t"), node("Add", ["one", "t"], "t1"),
                 node("Mul", ["half", "x"], "hx"), node("Mul", ["hx", "t1"], "act")], 18,
                lambda x: 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3))))
    if kind == "silu":
        return ([node("Sigmoid", ["x"], "sg"), node("Mul", ["x", "sg"], "act")], 18,
                lambda x: x / (1 + np.exp(-x)))
    if kind == "tanh":
        return [node("Tanh", ["x"], "act")], 18, np.tanh
    raise ValueError(kind)


CONSTS = {"sqrt2": np.array(math.sqrt(2)), "one": np.array(1.0), "half": np.array(0.5),
          "three": np.array(3.0), "k": np.array(0.044715), "c": np.array(math.sqrt(2 / math.pi))}


@pytest.mark.parametrize("kind", ["gelu-op", "gelu-erf", "gelu-tanh", "silu", "tanh"])
def test_identity_rule_activation(kind):
    """z = f(x) W: R_x = R_y exactly, i.e. ĝ_x = ĝ_y ⊙ y / (x + ε·sign x), ε = 1e-10, sign(0) = 1, over the whole
    region (the decomposed chains are one region); x = 0 gives R = 0 and no NaN."""
    nodes, opset, f = _activation(kind)
    rng = RNG(6)
    W = rng.normal(size=(8, 3))
    used = {i for n in nodes for i in n.input}
    model = build(nodes + [node("MatMul", ["act", "W"], "z")], {"x": ["b", 8]}, {"z": ["b", 3]},
                  {"W": W, **{k: v for k, v in CONSTS.items() if k in used}}, opset)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    x[0, 2] = x[1, 5] = x[2, 0] = 0.0
    x[1, 1], x[2, 3] = 1e-12, -1e-12
    target = [0, 2, 1]
    res = explain(model, {"x": x}, target)
    xd = x.astype(np.float64)
    y = f(xd)
    r_y = y * W[:, target].T  # relevance arriving at the activation output
    g_y = W[:, target].T
    g_x = g_y * y / (xd + np.where(xd >= 0, EPS_ACT, -EPS_ACT))
    assert rel_err(res.relevance["x"], xd * g_x) <= TOL
    assert rel_err(res.relevance["x"], r_y) <= TOL
    assert res.relevance["x"][0, 2] == 0 and res.relevance["x"][1, 5] == 0 and res.relevance["x"][2, 0] == 0
    rules = rules_of(model)  # one region; for the erf chain it ends at x·(1 + erf) (the ·½ after it is linear)
    assert list(rules.values()).count("identity") == 1, rules
    assert set(rules.values()) <= {"identity", "inside"}
    assert len(rules) == sum(n.op_type not in ("MatMul",) for n in model.graph.node) - (kind == "gelu-erf"), rules


def test_identity_rule_keeps_the_bias_outside_the_region():
    """Gelu(x W + b): the region is the Gelu alone (its input includes the bias), so the bias keeps its
    share: R_x = x ⊙ W ĝ_u with ĝ_u = ĝ_y ⊙ y / u, u = x W + b."""
    rng = RNG(7)
    W1, b1, W2 = rng.normal(size=(5, 6)), rng.normal(size=(6,)), rng.normal(size=(6, 2))
    model = build([node("MatMul", ["x", "W1"], "h"), node("Add", ["h", "b1"], "u"), node("Gelu", ["u"], "act"),
                   node("MatMul", ["act", "W2"], "z")], {"x": ["b", 5]}, {"z": ["b", 2]},
                  {"W1": W1, "b1": b1, "W2": W2}, opset=20)
    x = rng.normal(size=(2, 5)).astype(np.float32)
    target = [1, 0]
    res = explain(model, {"x": x}, target)
    u = x.astype(np.float64) @ W1 + b1
    y = 0.5 * u * (1 + erf(u / math.sqrt(2)))
    g_u = W2[:, target].T * y / u
    assert rel_err(res.relevance["x"], x * (g_u @ W1.T)) <= TOL


# ---- frozen normalisation statistic (Prop. 3.4) ------------------------------------------------------

def _rmsnorm(variant):
    """x · 1/sqrt(mean(x²) + eps) · w in the variants exporters emit."""
    square = node("Mul", ["x", "x"], "sq") if variant != "pow" else node("Pow", ["x", "two"], "sq")
    head = [square, node("ReduceMean", ["sq", "axes"], "ms", keepdims=1), node("Add", ["ms", "eps"], "mse")]
    if variant == "div":
        body = [node("Sqrt", ["mse"], "rms"), node("Div", ["x", "rms"], "n")]
    elif variant == "pow":
        body = [node("Pow", ["mse", "mhalf"], "inv"), node("Mul", ["x", "inv"], "n")]
    else:
        body = [node("Sqrt", ["mse"], "rms"), node("Reciprocal", ["rms"], "inv"), node("Mul", ["inv", "x"], "n")]
    return head + body + [node("Mul", ["n", "w"], "normed")]


@pytest.mark.parametrize("variant", ["reciprocal", "div", "pow"])
def test_rmsnorm_frozen_rms(variant):
    """RMSNorm with the rms frozen: ĝ_x = ĝ_y ⊙ w / rms, so R_x = R_y (no relevance into the statistic)."""
    rng = RNG(8)
    d, eps = 6, 1e-6
    w, W = 1 + 0.3 * rng.normal(size=(d,)), rng.normal(size=(d, 3))
    model = build(_rmsnorm(variant) + [node("MatMul", ["normed", "W"], "z")],
                  {"x": ["b", "s", d]}, {"z": ["b", "s", 3]},
                  {"w": w, "W": W, "axes": np.array([-1]), "eps": np.array(eps), "two": np.array(2.0),
                   "mhalf": np.array(-0.5)})
    x = rng.normal(size=(2, 4, d)).astype(np.float32)
    target, position = [2, 0], [1, 3]
    res = explain(model, {"x": x}, target, position)
    xd = x.astype(np.float64)
    rms = np.sqrt((xd ** 2).mean(-1, keepdims=True) + eps)
    want = np.zeros_like(xd)
    for b, (t, p) in enumerate(zip(target, position)):
        want[b, p] = xd[b, p] * w * W[:, t] / rms[b, p]
    assert rel_err(res.relevance["x"], want) <= TOL
    np.testing.assert_allclose(res.conservation(), res.logit, rtol=1e-5, atol=1e-6)
    rules = rules_of(model)
    assert rules["Div:n" if variant == "div" else "Mul:n"] == "frozen"
    assert list(rules.values()).count("frozen") == 1
    # (the x·x inside the statistic of the Mul variants is claimed "uniform" by the bilinear pass; no relevance
    # ever reaches it because the statistic is frozen, so it only shows in the plan's counts)


def _layernorm_expected(x, w, W, target, position, eps):
    """ĝ_x = (h − mean h)/σ with h = ĝ_y ⊙ w, σ = sqrt(var(x) + eps); R_x = x ⊙ ĝ_x."""
    want = np.zeros_like(x)
    for b, (t, p) in enumerate(zip(target, position)):
        row = x[b, p]
        sigma = np.sqrt(((row - row.mean()) ** 2).mean() + eps)
        h = W[:, t] * w
        want[b, p] = row * (h - h.mean()) / sigma
    return want


@pytest.mark.parametrize("form", ["op", "hand-written"])
def test_layernorm_frozen_std(form):
    rng = RNG(9)
    d, eps = 6, 1e-5
    w, beta, W = 1 + 0.3 * rng.normal(size=(d,)), 0.2 * rng.normal(size=(d,)), rng.normal(size=(d, 3))
    if form == "op":
        nodes = [node("LayerNormalization", ["x", "w", "beta"], "normed", axis=-1, epsilon=eps)]
    else:  # (x − μ) / sqrt(mean((x − μ)²) + ε) · w + β
        nodes = [node("ReduceMean", ["x", "axes"], "mu", keepdims=1), node("Sub", ["x", "mu"], "xc"),
                 node("Pow", ["xc", "two"], "sq"), node("ReduceMean", ["sq", "axes"], "var", keepdims=1),
                 node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"), node("Div", ["xc", "sd"], "xh"),
                 node("Mul", ["xh", "w"], "xw"), node("Add", ["xw", "beta"], "normed")]
    model = build(nodes + [node("MatMul", ["normed", "W"], "z")], {"x": ["b", "s", d]}, {"z": ["b", "s", 3]},
                  {"w": w, "beta": beta, "W": W, "axes": np.array([-1]), "eps": np.array(eps),
                   "two": np.array(2.0)})
    x = (rng.normal(size=(2, 4, d)) + 0.5).astype(np.float32)
    target, position = [1, 2], [0, 2]
    res = explain(model, {"x": x}, target, position)
    assert rel_err(res.relevance["x"], _layernorm_expected(x.astype(np.float64), w, W, target, position, eps)) <= TOL
    want_rule = "layernorm-frozen-std" if form == "op" else "frozen"
    assert list(rules_of(model).values()) == [want_rule]


@pytest.mark.parametrize("mask", ["int", "float-not-attributed"])
def test_mean_pooling_stays_linear(mask):
    """Σ_t h·m / Σ_t m with m not attributed: the denominator carries no relevance, so the pooling is linear
    (no frozen statistic): R_h[t] = h[t] ⊙ m_t W[:, c] / Σ m, and Σ R_h = z exactly (no bias)."""
    rng = RNG(10)
    W = rng.normal(size=(5, 3))
    cast = [node("Cast", ["m"], "mf", to=F)] if mask == "int" else [node("Identity", ["m"], "mf")]
    model = build(cast + [node("Unsqueeze", ["mf", "last"], "m3"), node("Mul", ["h", "m3"], "hm"),
                          node("ReduceSum", ["hm", "one_ax"], "num", keepdims=0),
                          node("ReduceSum", ["mf", "one_ax"], "den", keepdims=1),
                          node("Div", ["num", "den"], "pooled"), node("MatMul", ["pooled", "W"], "z")],
                  {"h": ["b", "s", 5], "m": ("int64", ["b", "s"]) if mask == "int" else ["b", "s"]},
                  {"z": ["b", 3]}, {"W": W, "last": np.array([-1]), "one_ax": np.array([1])})
    h = rng.normal(size=(2, 4, 5)).astype(np.float32)
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    feeds = {"h": h, "m": m.astype(np.int64 if mask == "int" else np.float32)}
    attribute = None if mask == "int" else ["h"]
    res = lrpc.Explainer(lrpc.compile(model, attribute=attribute)).explain(feeds, target=[2, 0])
    want = np.zeros(h.shape)
    for b, t in enumerate([2, 0]):
        want[b] = h[b] * (m[b][:, None] * W[:, t][None, :]) / m[b].sum()
    assert set(res.relevance) == {"h"}
    assert rel_err(res.relevance["h"], want) <= TOL
    np.testing.assert_allclose(res.conservation("h"), res.logit, rtol=1e-5, atol=1e-6)
    assert "frozen" not in rules_of(model).values()


# ---- ε-rule and γ-rule for linear layers (Eq. 8) -------------------------------------------------------

def _stab(z, e):
    return z + e * np.where(z >= 0, 1.0, -1.0)


def test_epsilon_rule_matmul():
    """Two bias-free MatMuls with --epsilon E: ĝ_x = W (ĝ_z ⊙ z / (z + E·sign z)) at every layer."""
    rng = RNG(11)
    W1, W2, E = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), 0.5
    model = build([node("MatMul", ["x", "W1"], "h"), node("MatMul", ["h", "W2"], "z")],
                  {"x": ["b", 5]}, {"z": ["b", 3]}, {"W1": W1, "W2": W2})
    x = rng.normal(size=(3, 5)).astype(np.float32) * 0.3
    target = [0, 1, 2]
    res = explain(model, {"x": x}, target, epsilon=E)
    h = x.astype(np.float64) @ W1
    z = h @ W2
    g_z = np.eye(3)[target]
    g_h = (g_z * z / _stab(z, E)) @ W2.T
    g_x = (g_h * h / _stab(h, E)) @ W1.T
    want = x * g_x
    assert rel_err(res.relevance["x"], want) <= TOL
    assert rel_err(res.relevance["x"], x * (g_z @ W2.T @ W1.T)) > 1e-2  # ε visibly matters here
    assert list(rules_of(model, epsilon=E).values()) == ["epsilon", "epsilon"]


def test_epsilon_rule_gemm_with_bias():
    """Gemm (transB=1) with bias: Eq. 8's z includes the bias, z = x Wᵀ + b."""
    rng = RNG(12)
    W, bias, E = rng.normal(size=(3, 5)), rng.normal(size=(3,)), 0.5
    model = build([node("Gemm", ["x", "W", "bias"], "z", transB=1)], {"x": ["b", 5]}, {"z": ["b", 3]},
                  {"W": W, "bias": bias})
    x = rng.normal(size=(2, 5)).astype(np.float32) * 0.3
    target = [2, 0]
    res = explain(model, {"x": x}, target, epsilon=E)
    z = x.astype(np.float64) @ W.T + bias
    g_z = np.eye(3)[target]
    assert rel_err(res.relevance["x"], x * ((g_z * z / _stab(z, E)) @ W)) <= TOL


def test_epsilon_rule_matmul_plus_bias_add():
    """nn.Linear on a [batch, seq, d] tensor exports as MatMul + Add. Eq. 8 (and LXT's rule on nn.Linear)
    stabilise by the layer's full pre-activation z = x W + b, the bias included, exactly as for the Gemm."""
    rng = RNG(13)
    W, bias, E = rng.normal(size=(5, 3)), rng.normal(size=(3,)), 0.5
    model = build([node("MatMul", ["x", "W"], "xw"), node("Add", ["xw", "bias"], "z")],
                  {"x": ["b", 5]}, {"z": ["b", 3]}, {"W": W, "bias": bias})
    x = rng.normal(size=(2, 5)).astype(np.float32) * 0.3
    target = [2, 0]
    res = explain(model, {"x": x}, target, epsilon=E)
    z = x.astype(np.float64) @ W + bias
    g_z = np.eye(3)[target]
    assert rel_err(res.relevance["x"], x * ((g_z * z / _stab(z, E)) @ W.T)) <= TOL


def _gamma_relevance(x, W, bias, G, R_z):
    """The generalised γ-rule (zennit's Gamma) in relevance form, contribution by contribution, for
    z = x W + b (x [batch, in], W [in, out]): where z_j > 0, R_ij = c⁺_ij R_j / stab(Σ_i c⁺_ij + b_j + G·b⁺_j)
    with c⁺_ij = x⁺_i (W + G·W⁺)_ij + x⁻_i (W + G·W⁻)_ij; where z_j < 0 the same with W⁺ and W⁻ swapped
    (bias b_j + G·b⁻_j); stab(d) = d + 1e-6·sign(d), sign(0) = 1."""
    x, W, bias = (np.asarray(v, np.float64) for v in (x, W, bias))
    z = x @ W + bias
    R = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(W.shape[1]):
            if z[n, j] == 0:
                continue
            up = 1 if z[n, j] > 0 else -1   # which sign's contributions are boosted
            boost = lambda v, s: v + G * (np.maximum(v, 0) if s > 0 else np.minimum(v, 0))  # noqa: E731
            c = np.array([boost(W[i, j], up if x[n, i] > 0 else -up) * x[n, i] for i in range(x.shape[1])])
            R[n] += c * R_z[n, j] / _stab(c.sum() + boost(bias[j], up), 1e-6)
    return R


@pytest.mark.parametrize("G", [0.0, 0.25, 100.0])
def test_gamma_rule_matmul(G):
    """--gamma-linear G on a MatMul, inputs and outputs of both signs, explaining a positive and a negative
    output: the generalised γ-rule, which differs from the textbook W + G·W⁺ form on negative inputs."""
    rng = RNG(14)
    W = rng.normal(size=(5, 3))
    model = build([node("MatMul", ["x", "W"], "z")], {"x": ["b", 5]}, {"z": ["b", 3]}, {"W": W})
    x = rng.normal(size=(2, 5)).astype(np.float32)
    z = x.astype(np.float64) @ W
    target = [int(np.argmax(z[0])), int(np.argmin(z[1]))]
    assert z[0, target[0]] > 0 > z[1, target[1]]
    res = explain(model, {"x": x}, target, gamma_linear=G)
    want = _gamma_relevance(x, W, np.zeros(3), G, z * np.eye(3)[target])
    assert rel_err(res.relevance["x"], want) <= TOL
    if G > 0:   # the textbook form (W + G·W⁺ for every output and input sign) is a different rule here
        Wg = W + G * np.maximum(W, 0)
        textbook = x * ((z * np.eye(3)[target] / _stab(x.astype(np.float64) @ Wg, 1e-6)) @ Wg.T)
        assert rel_err(textbook, want) > 1e-2
    assert list(rules_of(model, gamma_linear=G).values()) == ["gamma"]


@pytest.mark.parametrize("layout", ["gemm", "matmul+add"])
def test_gamma_rule_with_bias(layout):
    """γ-rule with a bias (Gemm transB=1, or MatMul + Add as nn.Linear exports): the bias enters the
    denominator boosted with the sign of the explained output (b + G·b⁺ where z > 0, b + G·b⁻ where z < 0)."""
    rng = RNG(15)
    W, bias, G = rng.normal(size=(5, 3)), rng.normal(size=(3,)), 0.25
    if layout == "gemm":
        nodes, inits = [node("Gemm", ["x", "Wt", "bias"], "z", transB=1)], {"Wt": W.T, "bias": bias}
    else:
        nodes, inits = [node("MatMul", ["x", "W"], "xw"), node("Add", ["xw", "bias"], "z")], {"W": W, "bias": bias}
    model = build(nodes, {"x": ["b", 5]}, {"z": ["b", 3]}, inits)
    x = rng.normal(size=(2, 5)).astype(np.float32)
    z = x.astype(np.float64) @ W + bias
    target = [int(np.argmax(z[0])), int(np.argmin(z[1]))]
    assert z[0, target[0]] > 0 > z[1, target[1]]
    res = explain(model, {"x": x}, target, gamma_linear=G)
    assert rel_err(res.relevance["x"], _gamma_relevance(x, W, bias, G, z * np.eye(3)[target])) <= TOL


# ---- attention: softmax + two bilinear products, masked with −inf; cp-lrp ---------------------------

def _attention_model(mask_style):
    """q, k, v [b, s, d] → softmax(q kᵀ · c + causal mask) v. The mask is −inf above the diagonal, added
    (`add`) or selected with Where (`where`)."""
    s = 4
    nodes = [node("Transpose", ["k"], "kt", perm=[0, 2, 1]), node("MatMul", ["q", "kt"], "qk"),
             node("Mul", ["qk", "scale"], "scores")]
    causal = np.triu(np.ones((s, s), bool), 1)
    if mask_style == "add":
        nodes.append(node("Add", ["scores", "neg_inf"], "masked"))
        inits = {"neg_inf": np.where(causal, -np.inf, 0.0)}
    else:
        nodes.append(node("Where", ["keep", "scores", "minus_inf"], "masked"))
        inits = {"keep": None, "minus_inf": np.array(-np.inf)}
    nodes += [node("Softmax", ["masked"], "probs", axis=-1), node("MatMul", ["probs", "v"], "out")]
    inits["scale"] = np.array(0.5)
    model = build(nodes, {"q": ["b", s, 3], "k": ["b", s, 3], "v": ["b", s, 3]}, {"out": ["b", s, 3]},
                  {k: v for k, v in inits.items() if v is not None})
    if mask_style == "where":
        model.graph.initializer.append(numpy_helper.from_array(~causal, "keep"))
    return model, causal


def _attention_expected(q, k, v, causal, target, position, preset):
    """The paper's relevance-form equations. A·V (Prop. 3.2, uniform): R_A,ij = ½ Σ_c A_ij v_jc/o_ic R_o,ic and
    R_v,jc = ½ Σ_i A_ij v_jc/o_ic R_o,ic. Softmax (Prop. 3.1): R_S,ij = S_ij (R_A,ij − A_ij Σ_l R_A,il), 0 where
    masked. The constant scale is linear. q·kᵀ (uniform): R_q,ic = ½ Σ_j q_ic k_jc/z_ij R_S,ij, R_k likewise.
    cp-lrp: A is a constant, R_v,jc = Σ_i A_ij v_jc/o_ic R_o,ic and q, k get nothing."""
    rq, rk, rv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    half = 1.0 if preset == "cp-lrp" else 0.5
    for b, (t, p) in enumerate(zip(target, position)):
        z = q[b] @ k[b].T
        scores = np.where(causal, -np.inf, 0.5 * z)
        A = softmax_np(scores)
        o = A @ v[b]
        r_o = np.zeros_like(o)
        r_o[p, t] = o[p, t]
        ratio = r_o / o                                            # R_o / o, zero where R_o is
        rv[b] = half * v[b] * (A.T @ ratio)                        # Σ_i A_ij v_jc R_o,ic / o_ic
        if preset == "cp-lrp":
            continue
        r_a = 0.5 * A * (ratio @ v[b].T)                           # Σ_c A_ij v_jc R_o,ic / o_ic
        r_s = np.where(causal, 0.0, np.where(causal, 0.0, scores) * (r_a - A * r_a.sum(-1, keepdims=True)))
        ratio_s = r_s / np.where(causal, 1.0, z)                   # R_qk / z: the scale is linear, R_qk = R_S
        rq[b] = 0.5 * q[b] * (ratio_s @ k[b])
        rk[b] = 0.5 * k[b] * (ratio_s.T @ q[b])
    return rq, rk, rv


@pytest.mark.parametrize("mask_style", ["add", "where"])
@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp"])
def test_masked_attention(preset, mask_style):
    """attnlrp: Q and K end with ¼ of their VJP, V with ½, the softmax by Prop. 3.1; cp-lrp: V takes it all
    (Σ R_v = explained value) and q, k nothing. Scores masked with −inf never turn into NaN."""
    model, causal = _attention_model(mask_style)
    rng = RNG(16)
    q, k, v = (rng.normal(size=(2, 4, 3)).astype(np.float32) for _ in range(3))
    target, position = [2, 0], [2, 1]
    res = explain(model, {"q": q, "k": k, "v": v}, target, position, preset=preset)
    want = _attention_expected(*(t.astype(np.float64) for t in (q, k, v)), causal, target, position, preset)
    for name, w in zip("qkv", want):
        if preset == "cp-lrp" and name != "v":
            assert np.all(res.relevance[name] == 0)
        else:
            assert rel_err(res.relevance[name], w) <= 1e-4, name
    if preset == "cp-lrp":
        np.testing.assert_allclose(res.relevance["v"].reshape(2, -1).sum(1), res.logit, rtol=1e-5, atol=1e-6)
    rules = rules_of(model, preset)
    assert rules["Softmax:probs"] == ("softmax" if preset == "attnlrp" else "none")
    if preset == "attnlrp":
        assert rules["MatMul:out"] == rules["MatMul:qk"] == "uniform"
    else:
        assert "MatMul:out" not in rules  # A is a constant, so A·v is an ordinary linear map of v


def test_masked_attention_gxi_has_no_nan():
    model, _ = _attention_model("add")
    rng = RNG(17)
    feeds = {n: rng.normal(size=(2, 4, 3)).astype(np.float32) for n in "qkv"}
    explain(model, feeds, [0, 1], [3, 0], preset="gxi")


def test_cp_lrp_gating_product():
    """cp-lrp: in SiLU(g) ⊙ u the operand through the activation takes none; u takes all of it."""
    rng = RNG(18)
    W = rng.normal(size=(6, 2))
    model = build([node("Sigmoid", ["g"], "sg"), node("Mul", ["g", "sg"], "act"), node("Mul", ["act", "u"], "y"),
                   node("MatMul", ["y", "W"], "z")], {"g": ["b", 6], "u": ["b", 6]}, {"z": ["b", 2]}, {"W": W})
    g, u = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    target = [1, 0]
    gd = g.astype(np.float64)
    silu = gd / (1 + np.exp(-gd))
    r_y = silu * u * W[:, target].T
    cp = explain(model, {"g": g, "u": u}, target, preset="cp-lrp")
    assert np.all(cp.relevance["g"] == 0)
    assert rel_err(cp.relevance["u"], r_y) <= TOL
    at = explain(model, {"g": g, "u": u}, target, preset="attnlrp")  # uniform: ½ each, SiLU by identity
    assert rel_err(at.relevance["g"], 0.5 * r_y) <= TOL
    assert rel_err(at.relevance["u"], 0.5 * r_y) <= TOL
    assert rules_of(model, "cp-lrp")["Mul:y"] == "gated"
    assert rules_of(model, "attnlrp")["Mul:y"] == "uniform"


# ---- gxi = finite differences -----------------------------------------------------------------------

def _random_graph():
    """x [b, 6] → LayerNorm(x W1 + b1) → tanh(·) ⊙ softmax(· W2) → RMS-normalised → W3 → [b, 3]: most of the
    table's VJP rows (MatMul, Add, LayerNormalization, Tanh, Softmax, Mul of two carrying operands, Pow,
    ReduceMean, Sqrt, Div, Erf, Sub, Transpose, Reshape, Concat, Slice)."""
    rng = RNG(19)
    p = {"W1": rng.normal(size=(6, 8)) * 0.6, "b1": rng.normal(size=(8,)) * 0.2, "lw": 1 + 0.2 * rng.normal(size=(8,)),
         "lb": 0.1 * rng.normal(size=(8,)), "W2": rng.normal(size=(8, 8)) * 0.6, "W3": rng.normal(size=(8, 3)),
         "axes": np.array([-1]), "two": np.array(2.0), "eps": np.array(1e-3), "shape": np.array([0, 2, 4]),
         "flat": np.array([0, 8]), "st": np.array([1]), "en": np.array([4]), "ax": np.array([1])}
    nodes = [node("MatMul", ["x", "W1"], "h"), node("Add", ["h", "b1"], "hb"),
             node("LayerNormalization", ["hb", "lw", "lb"], "ln", axis=-1, epsilon=1e-5),
             node("Tanh", ["ln"], "t"), node("MatMul", ["ln", "W2"], "l2"), node("Softmax", ["l2"], "sm", axis=-1),
             node("Mul", ["t", "sm"], "g"), node("Erf", ["g"], "e"), node("Sub", ["g", "e"], "ge"),
             node("Reshape", ["ge", "shape"], "r3"), node("Transpose", ["r3"], "r3t", perm=[0, 2, 1]),
             node("Reshape", ["r3t", "flat"], "rf"), node("Slice", ["rf", "st", "en", "ax"], "sl"),
             node("Concat", ["rf", "sl"], "cat", axis=1),
             node("Pow", ["cat", "two"], "sq"), node("ReduceMean", ["sq", "axes"], "ms", keepdims=1),
             node("Add", ["ms", "eps"], "mse"), node("Sqrt", ["mse"], "rms"), node("Div", ["rf", "rms"], "nrm"),
             node("MatMul", ["nrm", "W3"], "z")]
    return build(nodes, {"x": ["b", 6]}, {"z": ["b", 3]}, p), p


def _random_graph_np(x, p):
    h = x @ p["W1"] + p["b1"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ln = (h - mu) / np.sqrt(var + 1e-5) * p["lw"] + p["lb"]
    g = np.tanh(ln) * softmax_np(ln @ p["W2"])
    ge = g - erf(g)
    rf = ge.reshape(-1, 2, 4).transpose(0, 2, 1).reshape(-1, 8)
    cat = np.concatenate([rf, rf[:, 1:4]], axis=1)
    rms = np.sqrt((cat ** 2).mean(-1, keepdims=True) + 1e-3)
    return (rf / rms) @ p["W3"]


def test_gxi_equals_finite_differences():
    model, p = _random_graph()
    rng = RNG(20)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    target = [0, 2, 1]
    res = explain(model, {"x": x}, target, preset="gxi")
    xd = x.astype(np.float64)
    np.testing.assert_allclose(res.outputs["z"], _random_graph_np(xd, p), rtol=1e-4, atol=1e-5)  # the mirror is right
    step, grad = 1e-6, np.zeros_like(xd)
    for i in range(6):
        dx = np.zeros_like(xd)
        dx[:, i] = step
        up, down = _random_graph_np(xd + dx, p), _random_graph_np(xd - dx, p)
        grad[:, i] = (up - down)[np.arange(3), target] / (2 * step)
    assert rel_err(res.relevance["x"], xd * grad) <= 1e-4
    # and under attnlrp the same graph differs (norms frozen, tanh/erf regions, the product halved)
    assert rel_err(explain(model, {"x": x}, target).relevance["x"], xd * grad) > 1e-3
