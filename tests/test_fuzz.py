"""Issue 8 fuzzing. (1) hypothesis draws random graphs over the supported ops — random shapes, broadcasting,
fan-out, reshapes, transposes, slices, concatenations, gathers, reductions, norms, bilinear products — builds
the same computation in ONNX and in float64 torch, compiles the ONNX with `--preset gxi` and compares the
relevance with torch autograd's input × gradient. (2) random stacks of attention / norm / MLP blocks from
tests/reference_lrp.py, exported plainly, compiled with `attnlrp` and compared with the reference that applies
the same rules with autograd Functions.

Budget: LRPC_FUZZ_EXAMPLES random graphs (default 200; `make test-long` sets 3000) and a tenth as many block
stacks; derandomized (fixed seed), so CI is reproducible. One command for a longer run:
    LRPC_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q -n 2 tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import lrpc  # noqa: E402

import reference_lrp as ref  # noqa: E402

EXAMPLES = int(os.environ.get("LRPC_FUZZ_EXAMPLES", "200"))
BLOCK_EXAMPLES = max(10, EXAMPLES // 10)
BATCH = 2
TOL = 1e-3          # max |got − ref| / max |ref|, float32 explainer vs float64 torch (a rule bug is O(1))
BLOCK_TOL = 1e-4    # attnlrp vs the float32 reference (as test_attnlrp_reference.py)

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
BLOCKS = settings(max_examples=BLOCK_EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
STATS = {"graphs": 0, "max_err": 0.0, "blocks": 0, "block_max_err": 0.0}  # reported by conftest.py


# ---- a random program, built twice: ONNX nodes and float64 torch ---------------------------------------

class Program:
    def __init__(self, draw):
        self.draw = draw
        self.nodes, self.inits, self.inputs = [], [], []
        self.values: dict[str, torch.Tensor] = {}   # name → torch value (float64, requires grad upstream)
        self.pool: list[str] = []                   # relevance-carrying float tensors (all start with batch)
        self.count = 0
        self.rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        self.ops_used: list[str] = []

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array, hint="c"):
        array = np.asarray(array)
        name = self.name(hint)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
            self.values[name] = torch.tensor(array, dtype=torch.float64)
        else:
            self.values[name] = torch.tensor(array)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op, inputs, fn, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        result = fn(*[self.values[i] for i in inputs])
        for o, r in zip(outs, result if n_out > 1 else [result]):
            self.values[o] = r
        self.ops_used.append(op)
        return outs if n_out > 1 else outs[0]

    def shape(self, name):
        return tuple(self.values[name].shape)

    def pick(self):
        # favour recent tensors (deep graphs) but reach back for fan-out
        i = self.draw(st.integers(0, len(self.pool) - 1))
        j = self.draw(st.integers(max(0, len(self.pool) - 3), len(self.pool) - 1))
        return self.pool[max(i, j)] if self.draw(st.booleans()) else self.pool[i]

    def weights(self, shape, scale=None):
        scale = scale or 1.0 / math.sqrt(max(1, shape[0]))
        return self.rng.normal(size=shape) * scale


def _unary(p, x):
    kind = p.draw(st.sampled_from(["Tanh", "Sigmoid", "Relu", "Neg", "Softplus", "Erf", "Sin", "Cos", "Abs",
                                   "LeakyRelu", "Elu", "Exp", "Sqrt", "Reciprocal", "Log", "Pow", "Clip",
                                   "Identity", "HardSigmoid"]))
    T = torch
    if kind in ("Sqrt", "Reciprocal", "Log"):  # on 1 + x² (a positive operand, built in the graph too)
        sq = p.node("Mul", [x, x], lambda a, b: a * b)
        x = p.node("Add", [sq, p.const(np.array(1.0))], lambda a, b: a + b)
    fns = {"Tanh": T.tanh, "Sigmoid": T.sigmoid, "Relu": T.relu, "Neg": T.neg,
           "Softplus": torch.nn.functional.softplus, "Erf": T.erf, "Sin": T.sin, "Cos": T.cos, "Abs": T.abs,
           "Exp": lambda a: T.exp(T.clamp(a, max=1e9)), "Sqrt": T.sqrt, "Reciprocal": T.reciprocal,
           "Log": T.log, "Identity": lambda a: a}
    if kind == "LeakyRelu":
        return p.node(kind, [x], lambda a: torch.nn.functional.leaky_relu(a, 0.1), alpha=0.1)
    if kind == "Elu":
        return p.node(kind, [x], lambda a: torch.nn.functional.elu(a, 0.7), alpha=0.7)
    if kind == "HardSigmoid":
        return p.node(kind, [x], lambda a: torch.clamp(0.3 * a + 0.5, 0, 1), alpha=0.3, beta=0.5)
    if kind == "Exp":
        x = p.node("Tanh", [x], T.tanh)  # bounded exponent
    if kind == "Pow":
        e = p.draw(st.sampled_from([2.0, 3.0]))
        return p.node("Pow", [x, p.const(np.array(e))], lambda a, b: a ** b)
    if kind == "Clip":
        lo, hi = sorted(p.rng.normal(size=2))
        return p.node("Clip", [x, p.const(np.array(lo)), p.const(np.array(hi))],
                      lambda a, b, c: torch.clamp(a, b, c))
    return p.node(kind, [x], fns[kind])


def _broadcast_partner(p, x):
    """Something that broadcasts against x: a constant with some axes 1 (maybe fewer leading axes), or a
    reduction of a carrying tensor of x's shape over some axes (fan-out)."""
    shape = p.shape(x)
    if p.draw(st.booleans()):
        keep = [p.draw(st.booleans()) for _ in shape]
        cshape = [d if k else 1 for d, k in zip(shape, keep)]
        drop = p.draw(st.integers(0, len(shape)))
        cshape = cshape[drop:]
        return p.const(p.rng.normal(size=cshape) if cshape else np.array(p.rng.normal()))
    same = [t for t in p.pool if p.shape(t) == shape]
    other = p.draw(st.sampled_from(same))
    axes = [i for i, d in enumerate(shape) if i > 0 and d > 1 and p.draw(st.booleans())]
    if not axes:
        return other
    return p.node("ReduceMean", [other, p.const(np.array(axes, np.int64))],
                  lambda a, ax: a.mean(dim=axes, keepdim=True), keepdims=1)


def _binary(p, x):
    kind = p.draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Where"]))
    y = _broadcast_partner(p, x)
    if kind == "Div":  # divide by 1 + y² (never near zero)
        sq = p.node("Mul", [y, y], lambda a, b: a * b)
        y = p.node("Add", [sq, p.const(np.array(1.0))], lambda a, b: a + b)
        return p.node("Div", [x, y], lambda a, b: a / b)
    if kind in ("Max", "Min") and y == x:
        y = p.node("Tanh", [y], torch.tanh)
    if kind == "Where":
        cond = p.rng.random(size=p.shape(x)[1:]) > 0.5
        name = p.const(cond)
        return p.node("Where", [name, x, y], lambda c, a, b: torch.where(c, a, b))
    fns = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Max": torch.maximum, "Min": torch.minimum,
           "Sum": lambda a, b: a + b}
    return p.node(kind, [x, y], fns[kind])


def _matmul(p, x):
    shape = p.shape(x)
    if len(shape) >= 3 and p.draw(st.booleans()):  # bilinear: x @ (f(x'))ᵀ with x' of x's shape
        same = [t for t in p.pool if p.shape(t) == shape]
        other = p.draw(st.sampled_from(same))
        perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
        t = p.node("Transpose", [other], lambda a: a.permute(*perm), perm=perm)
        return p.node("MatMul", [x, t], torch.matmul)
    k = p.draw(st.integers(1, 5))
    if len(shape) == 2 and p.draw(st.booleans()):
        w = p.const(p.weights((k, shape[-1])))
        c = p.const(p.rng.normal(size=(k,)))
        return p.node("Gemm", [x, w, c], lambda a, b, cc: 0.7 * a @ b.T + 1.3 * cc, transB=1, alpha=0.7, beta=1.3)
    if p.draw(st.integers(0, 5)) == 0 and len(shape) >= 2:
        w = p.const(p.weights((shape[-1], k)))
        letters = "abcdefg"[: len(shape)]
        eq = f"{letters},{letters[-1]}z->{letters[:-1]}z"
        return p.node("Einsum", [x, w], lambda a, b: torch.einsum(eq, a, b), equation=eq)
    w = p.const(p.weights((shape[-1], k)))
    return p.node("MatMul", [x, w], torch.matmul)


def _reshape(p, x):
    shape = p.shape(x)
    kind = p.draw(st.sampled_from(["merge", "split", "unsqueeze", "squeeze", "flatten", "expand"]))
    if kind == "merge" and len(shape) >= 3:
        i = p.draw(st.integers(1, len(shape) - 2))
        new = list(shape[:i]) + [shape[i] * shape[i + 1]] + list(shape[i + 2:])
    elif kind == "split":
        cands = [(i, f) for i, d in enumerate(shape) if i > 0 for f in range(2, d) if d % f == 0]
        if not cands or len(shape) >= 5:
            return _unary(p, x)
        i, f = p.draw(st.sampled_from(cands))
        new = list(shape[:i]) + [f, shape[i] // f] + list(shape[i + 1:])
    elif kind == "unsqueeze" and len(shape) < 5:
        axis = p.draw(st.integers(1, len(shape)))
        return p.node("Unsqueeze", [x, p.const(np.array([axis], np.int64))], lambda a, ax: a.unsqueeze(axis))
    elif kind == "squeeze" and any(d == 1 for d in shape[1:]):
        axes = [i for i, d in enumerate(shape) if i > 0 and d == 1]
        return p.node("Squeeze", [x, p.const(np.array(axes, np.int64))],
                      lambda a, ax: a.reshape([d for i, d in enumerate(shape) if i not in axes]))
    elif kind == "flatten" and len(shape) >= 3:
        return p.node("Flatten", [x], lambda a: a.reshape(shape[0], -1), axis=1)
    elif kind == "expand" and any(d == 1 for d in shape[1:]):
        i = next(i for i, d in enumerate(shape) if i > 0 and d == 1)
        new = list(shape)
        new[i] = p.draw(st.integers(2, 3))
        return p.node("Expand", [x, p.const(np.array(new, np.int64))], lambda a, s: a.expand(*new))
    else:
        return _unary(p, x)
    spec = [0] + [-1 if i == len(new) - 1 and p.draw(st.booleans()) else d for i, d in enumerate(new) if i > 0]
    return p.node("Reshape", [x, p.const(np.array(spec, np.int64))], lambda a, s: a.reshape(new))


def _transpose(p, x):
    shape = p.shape(x)
    if len(shape) < 3:
        return _unary(p, x)
    rest = list(p.draw(st.permutations(list(range(1, len(shape))))))
    perm = [0] + rest
    return p.node("Transpose", [x], lambda a: a.permute(*perm), perm=perm)


def _slice_like(p, x):
    shape = p.shape(x)
    axes = [i for i, d in enumerate(shape) if i > 0 and d >= 2]
    kind = p.draw(st.sampled_from(["slice", "concat", "split", "gather", "gather_elements", "trilu"]))
    if kind == "concat":
        axis = p.draw(st.integers(1, len(shape) - 1))
        same = [t for t in p.pool if p.shape(t)[:axis] + p.shape(t)[axis + 1:] == shape[:axis] + shape[axis + 1:]
                and len(p.shape(t)) == len(shape)]
        others = [p.draw(st.sampled_from(same)) for _ in range(p.draw(st.integers(1, 2)))]
        neg = p.draw(st.booleans())
        return p.node("Concat", [x] + others, lambda *a: torch.cat(a, dim=axis),
                      axis=axis - len(shape) if neg else axis)
    if not axes:
        return _unary(p, x)
    axis = p.draw(st.sampled_from(axes))
    d = shape[axis]
    if kind == "slice":
        start = p.draw(st.integers(-d, d - 1))
        end = p.draw(st.sampled_from([d, d + 5, 2**62, -1, max(1, d - 1)]))
        s0 = start % d if start < 0 else start
        e0 = min(end, d) if end >= 0 else end % d
        if e0 <= s0:
            start, end, s0, e0 = 0, d, 0, d
        sl = [slice(None)] * len(shape)
        sl[axis] = slice(s0, e0)
        return p.node("Slice", [x, p.const(np.array([start], np.int64)), p.const(np.array([end], np.int64)),
                                p.const(np.array([axis], np.int64))], lambda a, *_: a[tuple(sl)])
    if kind == "split":
        first = p.draw(st.integers(1, d - 1))
        outs = p.node("Split", [x, p.const(np.array([first, d - first], np.int64))],
                      lambda a, s: torch.split(a, [first, d - first], dim=axis), n_out=2, axis=axis)
        p.pool.append(outs[1] if p.draw(st.booleans()) else outs[0])
        return outs[0] if p.pool[-1] == outs[1] else outs[1]
    if kind == "gather":
        idx = p.rng.integers(-d, d, size=p.draw(st.sampled_from([(), (3,), (2, 2)])))
        return p.node("Gather", [x, p.const(idx.astype(np.int64))],
                      lambda a, i: torch.index_select(a, axis, (i % d).reshape(-1)).reshape(
                          shape[:axis] + tuple(idx.shape) + shape[axis + 1:]), axis=axis)
    if kind == "gather_elements":
        idx = p.rng.integers(0, d, size=shape)
        return p.node("GatherElements", [x, p.const(idx.astype(np.int64))],
                      lambda a, i: torch.gather(a, axis, i), axis=axis)
    if len(shape) < 3:
        return _unary(p, x)
    k = int(p.draw(st.integers(-1, 1)))
    upper = int(p.draw(st.booleans()))
    return p.node("Trilu", [x, p.const(np.array(k, np.int64))],
                  lambda a, _: torch.triu(a, k) if upper else torch.tril(a, k), upper=upper)


def _reduce_norm(p, x):
    shape = p.shape(x)
    kind = p.draw(st.sampled_from(["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2", "ReduceSumSquare",
                                   "Softmax", "LogSoftmax", "LayerNormalization", "LpNormalization"]))
    axis = p.draw(st.integers(1, len(shape) - 1)) if len(shape) > 1 else 1
    if len(shape) == 1:
        return _unary(p, x)
    if kind in ("Softmax", "LogSoftmax"):
        fn = torch.softmax if kind == "Softmax" else torch.log_softmax
        return p.node(kind, [x], lambda a: fn(a, dim=axis), axis=axis)
    if kind in ("LayerNormalization", "LpNormalization") and shape[-1] < 4:
        return _unary(p, x)  # over ≤ 3 values: ill-conditioned, float32 noise dominates the gradient
    if kind == "LayerNormalization":
        w, b = p.const(1 + 0.3 * p.rng.normal(size=shape[-1])), p.const(0.2 * p.rng.normal(size=shape[-1]))
        return p.node(kind, [x, w, b], lambda a, ww, bb: torch.nn.functional.layer_norm(a, shape[-1:], ww, bb, 1e-5),
                      axis=-1, epsilon=1e-5)
    if kind == "LpNormalization":
        return p.node(kind, [x], lambda a: a / a.norm(dim=-1, keepdim=True), axis=-1, p=2)
    axes = sorted({axis} | {i for i in range(1, len(shape)) if p.draw(st.booleans())})
    keep = int(p.draw(st.booleans()))
    if not keep and len(axes) == len(shape) - 1:
        keep = 1  # keep at least [batch, ...] of rank 2 downstream
    fns = {"ReduceSum": lambda a: a.sum(dim=axes, keepdim=bool(keep)),
           "ReduceMean": lambda a: a.mean(dim=axes, keepdim=bool(keep)),
           "ReduceMax": lambda a: a.amax(dim=axes, keepdim=bool(keep)),
           "ReduceL2": lambda a: a.pow(2).sum(dim=axes, keepdim=bool(keep)).sqrt(),
           "ReduceSumSquare": lambda a: a.pow(2).sum(dim=axes, keepdim=bool(keep))}
    return p.node(kind, [x, p.const(np.array(axes, np.int64))], lambda a, _: fns[kind](a), keepdims=keep)


STEPS = [_unary, _binary, _matmul, _reshape, _transpose, _slice_like, _reduce_norm]


def build_program(draw):
    p = Program(draw)
    token = draw(st.integers(0, 3)) == 0
    if token:
        seq, hidden, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 4)), 11
        ids = p.rng.integers(0, vocab, size=(BATCH, seq))
        p.inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [BATCH, seq]))
        p.values["ids"] = torch.tensor(ids)
        table = p.const(p.rng.normal(size=(vocab, hidden)), "E")
        emb = p.node("Gather", [table, "ids"], lambda e, i: e[i].detach().requires_grad_(True))
        p.pool.append(emb)
        feed = {"ids": ids}
        attributed = {"ids": emb}
    else:
        rank = draw(st.integers(2, 4))
        shape = [BATCH] + [draw(st.integers(1, 4)) for _ in range(rank - 1)]
        feed, attributed = {}, {}
        for name in ["x", "z"][: draw(st.integers(1, 2))]:
            array = p.rng.normal(size=shape).astype(np.float32)
            p.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            p.values[name] = torch.tensor(array, dtype=torch.float64, requires_grad=True)
            p.pool.append(name)
            feed[name] = array
            attributed[name] = name
    for _ in range(draw(st.integers(1, 9))):
        x = p.pick()
        out = draw(st.sampled_from(STEPS))(p, x)
        if len(p.shape(out)) >= 2:  # keep [batch, ...]; a rank-1 result (batch gone) is left unused
            p.pool.append(out)
    # head: several pool tensors (fan-in), each flattened to [batch, n] and projected to the classes
    classes = draw(st.integers(2, 4))
    heads = sorted({p.pool[-1]} | {p.pick() for _ in range(draw(st.integers(0, 2)))})
    parts = []
    for t in heads:
        flat = p.node("Reshape", [t, p.const(np.array([BATCH, -1], np.int64))], lambda a, _: a.reshape(BATCH, -1))
        w = p.const(p.weights((p.shape(flat)[1], classes)))
        parts.append(p.node("MatMul", [flat, w], torch.matmul))
    y = parts[0] if len(parts) == 1 else p.node("Sum", parts, lambda *a: sum(a))
    p.nodes[-1].output[0] = "y"  # the last node made y; nothing consumes it
    p.values["y"] = p.values[y]
    graph = helper.make_graph(p.nodes, "fuzz", p.inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, classes])], p.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return p, model, feed, attributed, classes


def _reference(p, attributed, target):
    y = p.values["y"]
    leaves = {name: p.values[t] for name, t in attributed.items()}
    s = y[torch.arange(BATCH), torch.as_tensor(target)].sum()
    grads = torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
    out = {}
    for (name, leaf), g in zip(leaves.items(), grads):
        g = torch.zeros_like(leaf) if g is None else g
        r = (leaf * g).detach()
        out[name] = (r.sum(-1) if name == "ids" else r).numpy()
    return out


@FUZZ
@given(st.data())
def test_random_graphs_gxi_equal_autograd(data):
    p, model, feed, attributed, classes = build_program(data.draw)
    onnx.checker.check_model(model)
    target = p.rng.integers(0, classes, size=BATCH)
    proto = lrpc.compile(model, preset="gxi")  # every generated op is supported: no refusal expected
    result = lrpc.Explainer(proto).explain(feed, target=target)
    want_y = p.values["y"].detach().numpy()
    np.testing.assert_allclose(result.outputs["y"], want_y, rtol=1e-4, atol=1e-4 * max(1, np.abs(want_y).max()))
    expected = _reference(p, attributed, target)
    for name, want in expected.items():
        got = result.relevance[name]
        assert got.shape == want.shape
        assert np.all(np.isfinite(got)), (name, p.ops_used)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-3))
        STATS["max_err"] = max(STATS["max_err"], err)
        assert err <= TOL, (name, err, p.ops_used)
    STATS["graphs"] += 1


# ---- random block stacks, attnlrp vs the PyTorch reference ---------------------------------------------

D, HEADS, HIDDEN = 8, 2, 12

class StaticLayerNorm(ref.LayerNorm):
    """ref.LayerNorm with a static normalised shape (the legacy exporter cannot take x.shape[-1:])."""

    def forward(self, x, lrp: bool = False):
        if lrp:
            return super().forward(x, lrp)
        return torch.nn.functional.layer_norm(x, (D,), self.weight, self.bias, self.eps)


BLOCK_MAKERS = {
    "attention": lambda: ref.Attention(D, HEADS, causal=True),
    "attention-rotary": lambda: ref.Attention(D, HEADS, causal=True, rotary=True),
    "attention-bidirectional": lambda: ref.Attention(D, HEADS, causal=False),
    "gated-mlp": lambda: ref.GatedMLP(D, HIDDEN, bias=True),
    "gelu-mlp": lambda: ref.GeluMLP(D, HIDDEN),
    "gelu-tanh-mlp": lambda: ref.GeluMLP(D, HIDDEN, approximate="tanh"),
    "rmsnorm": lambda: ref.RMSNorm(D),
    "layernorm": lambda: StaticLayerNorm(D),
}


class Stack(torch.nn.Module):
    def __init__(self, names, residual, classes):
        super().__init__()
        self.blocks = torch.nn.ModuleList(BLOCK_MAKERS[n]() for n in names)
        self.residual = residual
        self.head = torch.nn.Linear(D, classes)

    def forward(self, x, lrp: bool = False):
        for block, res in zip(self.blocks, self.residual):
            h = block(x, lrp)
            x = x + h if res else h
        return self.head(x)


def _export(module, example):
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(ref.exportable(module), (example,), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}}, dynamo=False, opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


@BLOCKS
@given(names=st.lists(st.sampled_from(sorted(BLOCK_MAKERS)), min_size=1, max_size=4),
       residual=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 10_000),
       seq=st.integers(1, 6), classes=st.integers(2, 5))
def test_random_block_stacks_attnlrp_equal_reference(names, residual, seed, seq, classes):
    torch.manual_seed(seed)
    module = Stack(names, residual, classes).eval()
    example = torch.randn(BATCH, 3, D)
    explainer = lrpc.Explainer(lrpc.compile(_export(module, example), preset="attnlrp"))
    x = torch.randn(BATCH, seq, D)
    target = [seed % classes, (seed // 7) % classes]
    position = [seq - 1, (seed % seq) - seq]
    want, _ = ref.relevance(module, x, target, position, lrp=True)
    result = explainer.explain({"x": x.numpy()}, target=target, position=position)
    got = result.relevance["x"]
    assert np.all(np.isfinite(got))
    want = want.numpy()
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
    STATS["block_max_err"] = max(STATS["block_max_err"], err)
    STATS["blocks"] += 1
    assert err <= BLOCK_TOL, (names, residual, err)
