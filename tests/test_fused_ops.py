"""Models already optimised for onnxruntime: fused ops are decomposed into standard ONNX ops (lrpc.decompose).

Zoo models go through onnxruntime's transformer optimizer; the fused graph must give the unfused graph's
gxi and attnlrp relevance (≤ 1e-4 relative) and the same plan summary, and its decomposition must keep the
fused model's outputs (≤ 1e-5). Ops the optimizer does not emit on the zoo are checked on small hand-built
graphs against onnxruntime's own kernels and/or a numpy implementation of the op's spec.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc import models, ops
from lrpc.compiler import load
from lrpc.decompose import protect_nonstandard_ops

MS = "com.microsoft"
FUSED_OPS = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu",
             "RotaryEmbedding", "GroupQueryAttention", "BiasSplitGelu", "BiasAdd"}


def run_ort(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def decomposed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model as lrpc's relevance sees it: each fused node (kept for the explainer's forward) replaced by
    its decomposition (lrpc.ops.ALIAS; contrib ops are replaced by it already)."""
    model = load(proto)
    for node in [n for n in model.graph if ops.ALIAS in n.meta]:
        for old, new in zip(node.outputs, node.meta[ops.ALIAS]):
            if new is not None:
                name = old.name
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                old.name, new.name = None, name
        model.graph.remove(node, safe=True)
    for node in model.graph:   # (a decomposition's inner value onnx could not type: leave it untyped)
        for value in node.outputs:
            if value.type is not None and value.dtype is None:
                value.type = None
    return ir.to_proto(model)


def fused_ops(proto: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in proto.graph.node if n.op_type in FUSED_OPS and
            (n.domain == MS or not onnx.defs.has(n.op_type))}


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---- zoo models through onnxruntime's transformer optimizer -----------------------------------------------

# (id, zoo model, optimizer model_type, opt_level, fusion options, fused ops expected). Legacy exports
# (opset 17; dynamo exports give the same fusions but take seconds each).
ZOO_CASES = [
    ("bert", "bert", "bert", 1, (), {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}),
    ("bert-mha-rawmask", "bert", "bert", 0, ("mha", "raw"),
     {"EmbedLayerNormalization", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"}),
    ("gpt2", "gpt2", "gpt2", 1, (), {"SkipLayerNormalization", "FastGelu"}),
    ("llama-skip-rms", "llama", "gpt2", 1, (), {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}),
    ("llama-quickgelu", "llama", "gpt2", 2, (), {"SimplifiedLayerNormalization", "QuickGelu"}),
]

# The optimizer keeps state between calls in one process (a MultiHeadAttention request after an Attention
# one yields Attention), so each optimisation runs in a fresh interpreter.
OPTIMIZE = """
import logging, sys, warnings
logging.disable(logging.WARNING); warnings.simplefilter("ignore")
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
source, target, model_type, level, options = sys.argv[1:6]
fusion = FusionOptions(model_type)
if "mha" in options:
    fusion.use_multi_head_attention = True
if "raw" in options:
    fusion.use_raw_attention_mask(True)
optimized = optimize_model(source, model_type=model_type, num_heads=4, hidden_size=32, opt_level=int(level),
                           use_gpu=False, optimization_options=fusion)
optimized.save_model_to_file(target)  # (the saved file, unlike .model, carries the com.microsoft opset import)
"""


@pytest.fixture(scope="module")
def zoo_pair(tmp_path_factory):
    """zoo_pair(case) → (entry, unfused proto, fused proto, the fused proto as lrpc loads it, unfused results).
    Weights are perturbed so that norms and biases are not the identity (random init sets them to 1 / 0)."""
    folder = tmp_path_factory.mktemp("fused")
    exported, cache = {}, {}

    def get(case):
        case_id, name, model_type, level, options, _ = case
        entry = models.get(name)
        if name not in exported:
            module, _ = entry.build()
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))
            path = folder / f"{name}.onnx"
            onnx.save(entry.export(module=module, exporter="legacy"), path)
            exported[name] = path
        fused_path = folder / f"{case_id}.fused.onnx"
        subprocess.run([sys.executable, "-c", OPTIMIZE, str(exported[name]), str(fused_path), model_type, str(level),
                        ",".join(options)], check=True, capture_output=True)
        # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain, where onnx's version
        # converter (opset 17 → 18) stops on it: move it aside first (a no-op for the other cases).
        fused = onnx.load(fused_path)
        return entry, onnx.load(exported[name]), fused, protect_nonstandard_ops(fused), cache.setdefault(name, {})
    return get


def _explain(proto, preset, entry, feeds, rank3):
    explainer = lrpc.Explainer(lrpc.compile(proto, preset=preset))
    kw = {"position": np.array([-1, 3])} if rank3 else {}
    result = explainer.explain(feeds, target=np.array([1, 2]), **kw)
    return result.outputs[entry.output_name], result.relevance[entry.attributed[0]]


@pytest.mark.parametrize("case", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_optimized_zoo_model(case, zoo_pair):
    entry, unfused, fused, fused_in, cache = zoo_pair(case)
    assert case[5] <= fused_ops(fused), f"the optimizer emitted {fused_ops(fused)}"
    feeds = {k: v.numpy() for k, v in entry.inputs(2, 9, seed=7).items()}

    # the decomposition keeps the fused model's outputs, which are the unfused model's
    reference, fused_out = run_ort(unfused, feeds)[0], run_ort(fused, feeds)[0]
    plain = decomposed(fused_in)
    assert not fused_ops(plain)
    assert np.abs(run_ort(plain, feeds)[0] - fused_out).max() <= 1e-5 * max(1.0, np.abs(fused_out).max())
    assert np.abs(fused_out - reference).max() <= 1e-5 * max(1.0, np.abs(reference).max())

    rank3 = reference.ndim == 3
    for preset in ("gxi", "attnlrp"):
        if preset not in cache:
            cache[preset] = (_explain(unfused, preset, entry, feeds, rank3),
                             lrpc.plan_model(unfused, preset=preset).summary())
        (out_ref, rel_ref), plan_ref = cache[preset]
        out, rel = _explain(fused_in, preset, entry, feeds, rank3)
        assert np.abs(out - fused_out).max() <= 1e-5 * max(1.0, np.abs(fused_out).max())
        assert rel_err(rel, rel_ref) <= 1e-4, preset
        assert lrpc.plan_model(fused_in, preset=preset).summary() == plan_ref, preset


# ---- hand-built graphs ---------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def make_model(nodes, inputs, outputs, inits=(), opset=20, ms=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=imports, ir_version=10)
    return model


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def check_decomposition(model, feeds, reference=None, tol=1e-5, ort_reference=True, explain=True):
    """Decomposed outputs equal onnxruntime's fused kernels and/or the numpy reference; the model compiles
    under gxi and attnlrp and the explainers reproduce its outputs."""
    plain = decomposed(model)
    assert not fused_ops(plain) and all(n.domain in ("", "ai.onnx") for n in plain.graph.node)
    got = run_ort(plain, feeds)
    if ort_reference:
        for a, b in zip(got, run_ort(model, feeds)):
            assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())
    if reference is not None:
        for a, b in zip(got, reference):
            assert a.shape == b.shape and np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())
    if explain and got[0].ndim in (2, 3):   # lrpc explains [batch, classes] or [batch, seq, classes]
        for preset in ("gxi", "attnlrp"):
            explainer = lrpc.Explainer(lrpc.compile(model, preset=preset))
            y = got[0]
            kw = {"position": np.zeros(y.shape[0], np.int64)} if y.ndim == 3 else {}
            result = explainer.explain(feeds, target=np.zeros(y.shape[0], np.int64), **kw)
            first = model.graph.output[0].name
            assert np.abs(result.outputs[first] - y).max() <= 1e-5 * max(1.0, np.abs(y).max())
            assert all(np.isfinite(r).all() for r in result.relevance.values())
    return got


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ms_attention_ref(q, k, v, n, scale, mask=None, causal=False, filter_value=-10000.0, bias=None):
    """onnxruntime's CPU Attention/MultiHeadAttention (PrepareMask semantics), q [B,S,D], k/v [B,T,D]."""
    bsz, s, _ = q.shape
    t = k.shape[1]
    split = lambda x: x.reshape(bsz, x.shape[1], n, -1).transpose(0, 2, 1, 3)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) * scale
    add = np.zeros((bsz, 1, s, t), np.float32)
    if mask is not None:
        if mask.ndim == 1:
            allowed = np.arange(t)[None, :] < mask[:, None]
            add = np.where(allowed[:, None, None, :], 0.0, filter_value) + add
        elif mask.ndim == 2:
            add = np.where(mask[:, None, None, :] > 0, 0.0, filter_value) + add
        else:
            add = np.where(mask[:, None, :, :] > 0, 0.0, filter_value) + add
    if causal:
        add = np.where(np.tril(np.ones((s, t), bool)), add, np.finfo(np.float32).min)
    scores = scores + add
    if bias is not None:
        scores = scores + bias
    out = softmax(scores) @ split(v)
    return out.transpose(0, 2, 1, 3).reshape(bsz, s, -1).astype(np.float32)


@pytest.mark.parametrize("variant", ["mask1d", "mask2d", "mask3d-causal", "bias-scale"])
def test_ms_attention(variant):
    bsz, s, d, n = 2, 5, 8, 2
    w, bias = f32(d, 3 * d, scale=0.5), f32(3 * d, scale=0.1)
    x = f32(bsz, s, d)
    attrs, inputs, feeds, kw = {"num_heads": n}, ["x", "w", "b"], {"x": x}, {}
    extra_inputs = []
    mask = {"mask1d": np.array([5, 3], np.int32),
            "mask2d": np.array([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], np.int32),
            "mask3d-causal": (RNG.random((bsz, s, s)) > 0.3).astype(np.int32),
            "bias-scale": None}[variant]
    if mask is not None:
        inputs.append("m")
        feeds["m"] = mask
        extra_inputs.append(vi("m", TensorProto.INT32, list(mask.shape)))
        kw["mask"] = mask
    if variant == "mask3d-causal":
        attrs["unidirectional"] = 1
        kw["causal"] = True
    scale = 1 / math.sqrt(d // n)
    if variant == "bias-scale":
        attrs.update(scale=0.3, mask_filter_value=-1000.0)
        scale = 0.3
        inputs += ["", "", "ab"]
        feeds["ab"] = f32(1, n, s, s)
        extra_inputs.append(vi("ab", TensorProto.FLOAT, [1, n, s, s]))
        kw["bias"] = feeds["ab"]
    node = helper.make_node("Attention", inputs, ["y"], domain=MS, **attrs)
    model = make_model([node], [vi("x", TensorProto.FLOAT, [bsz, s, d])] + extra_inputs,
                       [vi("y", TensorProto.FLOAT, None)], [("w", w), ("b", bias)])
    qkv = x @ w + bias
    ref = ms_attention_ref(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], n, scale, **kw)
    check_decomposition(model, feeds, [ref])


def test_ms_multi_head_attention_cross():
    bsz, s, t, d, n = 2, 4, 6, 8, 2
    q, k, v, bias = f32(bsz, s, d), f32(bsz, t, d), f32(bsz, t, d), f32(3 * d, scale=0.1)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], np.int32)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "b", "m"], ["y"], domain=MS, num_heads=n)
    model = make_model([node], [vi("q", TensorProto.FLOAT, [bsz, s, d]), vi("k", TensorProto.FLOAT, [bsz, t, d]),
                                vi("v", TensorProto.FLOAT, [bsz, t, d]), vi("m", TensorProto.INT32, [bsz, t])],
                       [vi("y", TensorProto.FLOAT, None)], [("b", bias)])
    ref = ms_attention_ref(q + bias[:d], k + bias[d:2 * d], v + bias[2 * d:], n, 1 / math.sqrt(d // n), mask=mask)
    check_decomposition(model, {"q": q, "k": k, "v": v, "m": mask}, [ref])


def onnx_reference(model, feeds):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("variant", ["4d", "3d-gqa-causal", "bool-mask-dead-row", "float-mask-softcap"])
def test_onnx_attention_23(variant):
    bsz, s, hd = 2, 5, 4
    attrs = {}
    if variant == "3d-gqa-causal":
        nq, nkv = 4, 2
        shapes = ([bsz, s, nq * hd], [bsz, s, nkv * hd], [bsz, s, nkv * hd])
        attrs.update(q_num_heads=nq, kv_num_heads=nkv, is_causal=1)
    else:
        shapes = ([bsz, 2, s, hd], [bsz, 2, s + 1, hd], [bsz, 2, s + 1, hd])
    feeds = {name: f32(*shape) for name, shape in zip("qkv", shapes)}
    inputs, extra = ["q", "k", "v"], []
    if variant == "bool-mask-dead-row":
        mask = RNG.random((bsz, 1, s, s + 1)) > 0.4
        mask[0, 0, 2, :] = False     # a query that may see no key: zeros by the spec
        feeds["m"] = mask
        extra.append(vi("m", TensorProto.BOOL, list(mask.shape)))
        inputs.append("m")
    if variant == "float-mask-softcap":
        feeds["m"] = f32(s, s + 1)
        extra.append(vi("m", TensorProto.FLOAT, [s, s + 1]))
        inputs.append("m")
        attrs.update(softcap=2.0, scale=0.7)
    node = helper.make_node("Attention", inputs, ["y"], **attrs)
    model = make_model([node], [vi(n, TensorProto.FLOAT, sh) for n, sh in zip("qkv", shapes)] + extra,
                       [vi("y", TensorProto.FLOAT, None)], opset=23, ms=False)
    check_decomposition(model, feeds, onnx_reference(model, feeds), ort_reference=False)


@pytest.mark.parametrize("variant", ["4d-interleaved-positions", "3d-partial", "ms-3d", "ms-3d-interleaved-offset"])
def test_rotary_embedding(variant):
    bsz, s, n, hd, max_pos = 2, 5, 2, 8, 16
    ms = variant.startswith("ms")
    rot = 4 if variant == "3d-partial" else hd
    attrs = {"interleaved": int("interleaved" in variant)}
    if variant == "3d-partial":
        attrs["rotary_embedding_dim"] = rot
    if "3d" in variant:
        attrs["num_heads"] = n
        shape = [bsz, s, n * hd]
    else:
        shape = [bsz, n, s, hd]
    x = f32(*shape)
    angles = np.arange(max_pos)[:, None] * (1.0 / 10000 ** (np.arange(0, rot, 2) / rot))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = RNG.integers(0, max_pos, (bsz, s)).astype(np.int64)
    feeds = {"x": x}
    if ms:
        pos = np.array([3], np.int64) if "offset" in variant else positions
        feeds["p"] = pos
        node = helper.make_node("RotaryEmbedding", ["x", "p", "cos", "sin"], ["y"], domain=MS, **attrs)
        inits = [("cos", cos), ("sin", sin)]
        ref_pos = (3 + np.arange(s))[None, :].repeat(bsz, 0) if "offset" in variant else positions
        extra = [vi("p", TensorProto.INT64, list(pos.shape))]
    elif variant == "3d-partial":   # no position ids: caches already [B, S, rot/2]
        node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], **attrs)
        inits = [("cos", cos[positions]), ("sin", sin[positions])]
        ref_pos, extra = positions, []
    else:
        feeds["p"] = positions
        node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "p"], ["y"], **attrs)
        inits = [("cos", cos), ("sin", sin)]
        ref_pos, extra = positions, [vi("p", TensorProto.INT64, [bsz, s])]
    model = make_model([node], [vi("x", TensorProto.FLOAT, shape)] + extra, [vi("y", TensorProto.FLOAT, None)],
                       inits, opset=20 if ms else 23, ms=ms)
    from onnx.reference.ops.op_rotary_embedding import rotary_embedding
    ref = rotary_embedding(x, cos[ref_pos], sin[ref_pos], interleaved=attrs["interleaved"],
                           rotary_embedding_dim=rot, num_heads=n)
    check_decomposition(model, feeds, [ref], ort_reference=ms)


def gelu(x, tanh=False):
    if tanh:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@pytest.mark.parametrize("opset", [18, 20])
def test_activations(opset):
    x, bias = f32(2, 3, 8), f32(8, scale=0.3)
    nodes = [helper.make_node("BiasGelu", ["x", "b"], ["y1"], domain=MS),
             helper.make_node("FastGelu", ["x", "b"], ["y2"], domain=MS),
             helper.make_node("FastGelu", ["x"], ["y3"], domain=MS),
             helper.make_node("Gelu", ["x"], ["y4"], domain=MS),
             helper.make_node("QuickGelu", ["x"], ["y5"], domain=MS, alpha=1.702),
             helper.make_node("QuickGelu", ["x"], ["y6"], domain=MS, alpha=1.0),
             helper.make_node("Concat", ["y1", "y2", "y3", "y4", "y5", "y6"], ["y"], axis=-1)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 8])], [vi("y", TensorProto.FLOAT, None)],
                       [("b", bias)], opset=opset)
    sig = lambda z: 1 / (1 + np.exp(-z))
    ref = np.concatenate([gelu(x + bias), gelu(x + bias, True), gelu(x, True), gelu(x), x * sig(1.702 * x),
                          x * sig(x)], -1)
    check_decomposition(model, {"x": x}, [ref])


def test_cuda_only_bias_ops():
    """BiasSplitGelu and BiasAdd have no CPU kernel: checked against numpy only."""
    x, bias, skip = f32(2, 3, 8), f32(8, scale=0.3), f32(2, 3, 4)
    nodes = [helper.make_node("BiasSplitGelu", ["x", "b"], ["g"], domain=MS),
             helper.make_node("BiasAdd", ["g", "b4", "skip"], ["y"], domain=MS)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 8]), vi("skip", TensorProto.FLOAT, [2, 3, 4])],
                       [vi("y", TensorProto.FLOAT, None)], [("b", bias), ("b4", bias[:4])])
    h = x + bias
    ref = h[..., :4] * gelu(h[..., 4:]) + bias[:4] + skip
    check_decomposition(model, {"x": x, "skip": skip}, [ref], ort_reference=False)


def rms(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_norms():
    x, skip, w, beta, bias = f32(2, 3, 8), f32(2, 3, 8), f32(8), f32(8), f32(8)
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "w", "beta", "bias"], ["a", "", "", "s"],
                              domain=MS, epsilon=1e-5),
             helper.make_node("SkipLayerNormalization", ["a", "skip", "w"], ["c"], domain=MS, epsilon=1e-5),
             helper.make_node("SkipSimplifiedLayerNormalization", ["c", "x", "w", "bias"], ["d", "", "", "t"],
                              domain=MS, epsilon=1e-6),
             helper.make_node("SimplifiedLayerNormalization", ["d", "w"], ["y"], epsilon=1e-6, axis=-1)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 8]), vi("skip", TensorProto.FLOAT, [2, 3, 8])],
                       [vi("y", TensorProto.FLOAT, None), vi("s", TensorProto.FLOAT, None),
                        vi("t", TensorProto.FLOAT, None)],
                       [("w", w), ("beta", beta), ("bias", bias)])
    s = x + skip + bias
    a = layer_norm(s, w, beta, 1e-5)
    c = layer_norm(a + skip, w, 0, 1e-5)
    t = c + x + bias
    ref = [rms(rms(t, w, 1e-6), w, 1e-6), s, t]
    check_decomposition(model, {"x": x, "skip": skip}, ref)
    # the norm pass sees the statistics: two LayerNormalizations and two frozen RMS statistics
    summary = lrpc.plan_model(model, preset="attnlrp").summary()
    assert summary["layernorm-frozen-std"] == 2 and summary["frozen"] == 2


def test_rms_normalization_23():
    x, w = f32(2, 3, 8), f32(8)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], epsilon=1e-6, axis=-1)
    model = make_model([node], [vi("x", TensorProto.FLOAT, [2, 3, 8])], [vi("y", TensorProto.FLOAT, None)],
                       [("w", w)], opset=23, ms=False)
    check_decomposition(model, {"x": x}, [rms(x, w, 1e-6)], ort_reference=False)


def test_simplified_layer_norm_below_opset_18():
    """onnxruntime registers SimplifiedLayerNormalization in the ONNX domain; onnx's version converter stops
    on it, so `protect_nonstandard_ops` moves it aside before canonicalisation."""
    x, w = f32(2, 3, 8), f32(8)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], epsilon=1e-6, axis=-1)
    model = make_model([node], [vi("x", TensorProto.FLOAT, [2, 3, 8])], [vi("y", TensorProto.FLOAT, None)],
                       [("w", w)], opset=17, ms=False)
    explained = lrpc.Explainer(lrpc.compile(model, preset="gxi")).explain({"x": x}, target=[0, 1], position=[0, 2])
    assert np.allclose(explained.outputs["y"], rms(x, w, 1e-6), atol=1e-5)  # load() protects it on the way
    check_decomposition(protect_nonstandard_ops(model), {"x": x}, [rms(x, w, 1e-6)], ort_reference=False)


def test_missing_contrib_opset_import():
    """`optimize_model(..., opt_level=0).model` (before saving) imports no com.microsoft opset."""
    x = f32(2, 3, 8)
    node = helper.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=1.702)
    model = make_model([node], [vi("x", TensorProto.FLOAT, [2, 3, 8])], [vi("y", TensorProto.FLOAT, None)],
                       opset=17, ms=False)
    explained = lrpc.Explainer(lrpc.compile(model, preset="gxi")).explain({"x": x}, target=[0, 1], position=[0, 2])
    assert np.allclose(explained.outputs["y"], x / (1 + np.exp(-1.702 * x)), atol=1e-5)  # load() adds the import
    check_decomposition(protect_nonstandard_ops(model), {"x": x}, [x / (1 + np.exp(-1.702 * x))])


@pytest.mark.parametrize("variant", ["segments-mask", "position-ids"])
def test_embed_layer_norm(variant):
    bsz, s, d, vocab = 2, 5, 8, 20
    word, pos, seg, w, b = f32(vocab, d), f32(16, d), f32(2, d), f32(d), f32(d)
    ids = RNG.integers(0, vocab, (bsz, s)).astype(np.int32)
    feeds = {"ids": ids}
    inputs = [vi("ids", TensorProto.INT32, [bsz, s])]
    if variant == "segments-mask":
        segs = RNG.integers(0, 2, (bsz, s)).astype(np.int32)
        mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
        feeds.update(segs=segs, mask=mask)
        inputs += [vi("segs", TensorProto.INT32, [bsz, s]), vi("mask", TensorProto.INT32, [bsz, s])]
        names = ["ids", "segs", "word", "pos", "seg", "w", "b", "mask"]
        total = word[ids] + pos[np.arange(s)] + seg[segs]
        mask_index = mask.sum(1).astype(np.int32)
    else:   # as the optimizer writes DistilBERT's dynamo export: no segments, no mask, explicit positions
        positions = np.array([[2, 3, 4, 5, 6]], np.int32)
        feeds["positions"] = positions
        inputs.append(vi("positions", TensorProto.INT32, [1, s]))
        names = ["ids", "", "word", "pos", "", "w", "b", "", "positions"]
        total = word[ids] + pos[positions]
        mask_index = np.zeros(bsz, np.int32)
    node = helper.make_node("EmbedLayerNormalization", names, ["y", "mask_index", "sum"], domain=MS, epsilon=1e-12)
    model = make_model([node], inputs, [vi("y", TensorProto.FLOAT, None), vi("mask_index", TensorProto.INT32, None),
                                        vi("sum", TensorProto.FLOAT, None)],
                       [("word", word), ("pos", pos), ("seg", seg), ("w", w), ("b", b)])
    check_decomposition(model, feeds, [layer_norm(total, w, b, 1e-12), mask_index, total])


@pytest.mark.parametrize("case", ["gqa", "attention-shared-buffer"])
def test_unsupported_fused_ops_are_named(case):
    if case == "gqa":
        node = helper.make_node("GroupQueryAttention", ["x", "", "", "", "", "sl", "tl"], ["y", "pk", "pv"],
                                domain=MS, num_heads=2, kv_num_heads=1, name="gqa_node")
        inputs = [vi("x", TensorProto.FLOAT, [1, 3, 8]), vi("sl", TensorProto.INT32, [1]),
                  vi("tl", TensorProto.INT32, [1])]
        inits = []
    else:
        node = helper.make_node("Attention", ["x", "w", "", "", "past", "", "past_length"], ["y", "present"],
                                domain=MS, num_heads=2, past_present_share_buffer=1, name="attn_node")
        inputs = [vi("x", TensorProto.FLOAT, [1, 3, 8]), vi("past", TensorProto.FLOAT, [2, 1, 2, 4, 4]),
                  vi("past_length", TensorProto.INT32, [1])]
        inits = [("w", f32(8, 24))]
    model = make_model([node], inputs, [vi("y", TensorProto.FLOAT, None)], inits)
    with pytest.raises(lrpc.LrpcError, match=f"{node.name}.*{node.op_type}"):
        lrpc.compile(model, preset="gxi")
