"""The speed machinery of the emitted graph, checked for what it computes (never for time): build-time
folding in the Builder, compile-time shape values, the peepholes of lrpc.optimise, one-row ĝ through
attention, and shapes filled in by symbolic inference. Each is compared with the graph it replaces."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
import pytest

import lrpc
from lrpc import models, optimise
from lrpc.rows import Rows
from lrpc.graph import Builder, static_value
from lrpc.runtime import Explainer


def _graph(*inputs):
    return ir.Graph(list(inputs), [], nodes=[], opset_imports={"": 18})


def _value(name, dims, dtype=ir.DataType.FLOAT):
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


def test_static_value_evaluates_runtime_shape_arithmetic():
    """TorchScript's rotate_half bound x.shape[-1] // 2: Shape → Gather → Div → Cast → Unsqueeze is 32,
    though x has symbolic dims; a bound that reads a symbolic dim stays unknown."""
    x = _value("x", ["batch", 8, "sequence", 64])
    b = Builder(_graph(x))
    half = b.Unsqueeze(b.Cast(b.Div(b.Gather(b.Shape(x), b.i64(3), axis=0), b.i64(2)), to=7), b.i64([0]))
    assert static_value(half).tolist() == [32]
    seq = b.Gather(b.Shape(x), b.i64(2), axis=0)
    assert static_value(seq) is None
    assert static_value(b.Concat(b.i64([1, -1]), b.Unsqueeze(half, b.i64([0])), axis=0)) is None  # rank 2 vs 1
    assert static_value(b.Concat(b.i64([1, -1]), half, axis=0)).tolist() == [1, -1, 32]


def test_builder_folds_static_shapes_and_inverse_transposes():
    x = _value("x", ["batch", 8, "sequence", 64])
    b = Builder(_graph(x))
    assert static_value(b.Shape(x, start=-1)).tolist() == [64]   # folded: no Shape node
    assert b.Shape(x).producer().op_type == "Shape"               # the symbolic dims are read at run time
    swapped = b.Transpose(x, perm=[0, 1, 3, 2])
    assert b.Transpose(swapped, perm=[0, 1, 3, 2]) is x
    scaled = b.Mul(swapped, b.f32(0.5))                           # a scalar product commutes with it
    back = b.Transpose(scaled, perm=[0, 1, 3, 2])
    assert back.producer().op_type == "Mul" and back.producer().inputs[0] is x
    flat = b.Reshape(b.Reshape(x, b.i64([-1, 64])), b.i64([-1, 8, 64]))
    assert flat.producer().inputs[0] is x
    assert {n.op_type for n in b.graph} >= {"Transpose", "Mul", "Reshape"}


def _run(path, entry, seq=11):
    inputs = {k: v.numpy() for k, v in entry.inputs(2, seq, seed=4).items()}
    return Explainer(path).explain(inputs, target=np.array([1, 5]), position=np.array([-1, 3]))


def _ops(path):
    """The relevance graph's op types; a Pad that appends the attention reverse's column of ones to v
    (lrpc.vjp_norms: the softmax row sums folded into the product) is listed as "Pad(ones)"."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute[0].name == "value"})

    def ones(n):
        return n.op_type == "Pad" and len(n.input) > 2 and n.input[2] in constants \
            and float(constants[n.input[2]]) == 1.0
    return ["Pad(ones)" if ones(n) else n.op_type for n in graph.node if n.name.startswith("lrp_")]


def test_peepholes_keep_relevance_and_remove_ops(tmp_path, zoo_export, monkeypatch):
    """With and without lrpc.optimise's peepholes (scale into Gemm α, sums into Gemm C, complementary pads
    into a Concat, the rotary reverse's halves swapped): the same relevance, and the ops they remove are gone."""
    entry = models.get("llama")
    _, proto = zoo_export("llama", "dynamo", None)
    fast, plain = tmp_path / "fast.onnx", tmp_path / "plain.onnx"
    lrpc.compile(proto, output=fast, causal_blocks=0)   # (the plain graph's ops, not inside an If)
    for name in ("scale_into_gemm", "accumulate_in_gemm", "pads_to_concat", "rotary_swap"):
        monkeypatch.setattr(optimise, name, lambda *a: 0)
    lrpc.compile(proto, output=plain, causal_blocks=0)
    a, b = _run(fast, entry), _run(plain, entry)
    ref = b.relevance["input_ids"]
    assert np.abs(a.relevance["input_ids"] - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(a.outputs["logits"], b.outputs["logits"])
    fast_ops, plain_ops = _ops(fast), _ops(plain)
    assert fast_ops.count("Pad") == 0 < plain_ops.count("Pad")          # rotary rotate_half: Concat instead
    assert fast_ops.count("Sum") < plain_ops.count("Sum")               # q/k/v and gate/up ĝ summed in Gemm C
    assert fast_ops.count("Neg") < plain_ops.count("Neg") and "Slice" in fast_ops   # rotary: halves swapped
    graph = onnx.load(str(fast), load_external_data=False).graph
    assert any(n.op_type == "Gemm" and len(n.input) == 3 for n in graph.node)
    assert any(n.op_type == "Gemm" and any(a.name == "alpha" and a.f == 0.5 for a in n.attribute) for n in graph.node)


def _rotary_reverse(k=3, heads=2, seq=5, dim=8):
    """ĝ of q' = q·cos + rotate_half(q)·sin as lrpc emits it: Sum(Concat(a₂, −a₁), ĝ·cos) with a = ĝ·sin split
    in halves. Returns the graph, its ĝ / sin / cos inputs and the reverse's output."""
    from onnx import TensorProto, helper
    half = helper.make_tensor("lrp_half", TensorProto.INT64, [2], [dim // 2] * 2)
    nodes = [helper.make_node("Mul", ["g", "sin"], ["a"], name="lrp_Mul_sin"),
             helper.make_node("Split", ["a", "lrp_half"], ["a1", "a2"], axis=-1, name="lrp_Split"),
             helper.make_node("Neg", ["a1"], ["n1"], name="lrp_Neg"),
             helper.make_node("Concat", ["a2", "n1"], ["r"], axis=-1, name="lrp_Concat"),
             helper.make_node("Mul", ["g", "cos"], ["c"], name="lrp_Mul_cos"),
             helper.make_node("Sum", ["r", "c"], ["s"], name="lrp_Sum"),
             helper.make_node("Identity", ["s"], ["y"], name="lrp_Identity")]   # (a graph output is kept as is)
    inputs = [helper.make_tensor_value_info("g", TensorProto.FLOAT, [k, 1, heads, seq, dim]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [1, 1, seq, dim]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, 1, seq, dim])]
    graph = helper.make_graph(nodes, "rotary", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [half])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run_ir(model, feed):
    import onnxruntime as ort
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_rotary_swap_is_the_rotary_reverse_bit_for_bit():
    """optimise.rotary_swap: swap(ĝ·ŝ) + ĝ·cos, ŝ = Concat(−sin₁, sin₂), gives the emitted rotate_halfᵀ(ĝ·sin) +
    ĝ·cos bit for bit, and torch autograd's gradient of q·cos + rotate_half(q)·sin; the K-wide ĝ meets no
    Split, Neg or Concat any more (those run on sin, once)."""
    import torch
    rng = np.random.default_rng(3)
    feed = {"g": rng.standard_normal((3, 1, 2, 5, 8), np.float32),
            "sin": rng.standard_normal((1, 1, 5, 8), np.float32), "cos": rng.standard_normal((1, 1, 5, 8), np.float32)}
    model = _rotary_reverse()
    before = _run_ir(model, feed)
    assert optimise.rotary_swap(model.graph, Builder(model.graph)) == 1
    model.graph.sort()
    after = _run_ir(model, feed)
    assert np.array_equal(after, before)

    q = torch.zeros(3, 1, 2, 5, 8, requires_grad=True)
    sin, cos = torch.from_numpy(feed["sin"]), torch.from_numpy(feed["cos"])
    rotate_half = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)   # (HF's rotate_half)
    (q * cos + rotate_half * sin).backward(torch.from_numpy(feed["g"]))
    assert np.abs(after - q.grad.numpy()).max() <= 1e-6 * np.abs(q.grad.numpy()).max()

    reads_g = {node.op_type for node in model.graph if model.graph.inputs[0] in node.inputs}
    assert reads_g == {"Mul"}
    assert {node.inputs[0].name for node in model.graph if node.op_type == "Split"} == {"sin"}


def test_rotary_swap_leaves_other_shapes():
    """A sin as wide as one half (broadcast) is no rotary embedding's: no rewrite."""
    model = _rotary_reverse()
    model.graph.inputs[1].shape = ir.Shape([1, 1, 5, 1])
    assert optimise.rotary_swap(model.graph, Builder(model.graph)) == 0


@pytest.mark.parametrize("name,exporter", [("llama", "legacy"), ("phi3", "dynamo"), ("qwen3", "dynamo")])
def test_rotary_swap_found_on_exports(name, exporter, tmp_path, zoo_export, monkeypatch):
    """Each attention layer's q and k rotary reverse is rewritten, in TorchScript and dynamo exports of
    several rotary families, and the relevance is the one without the rewrite, bit for bit."""
    entry = models.get(name)
    _, proto = zoo_export(name, exporter, None)
    fast, plain = tmp_path / "fast.onnx", tmp_path / "plain.onnx"
    found, rewrite = [], optimise.rotary_swap
    monkeypatch.setattr(optimise, "rotary_swap", lambda *a: found.append(rewrite(*a)) or found[-1])
    lrpc.compile(proto, output=fast, causal_blocks=0)
    monkeypatch.setattr(optimise, "rotary_swap", lambda *a: 0)
    lrpc.compile(proto, output=plain, causal_blocks=0)
    layers = sum(n.op_type == "Softmax" for n in onnx.load(str(plain), load_external_data=False).graph.node
                 if not n.name.startswith("lrp_"))
    assert found == [2 * layers]
    a, b = _run(fast, entry), _run(plain, entry)
    assert np.array_equal(a.relevance["input_ids"], b.relevance["input_ids"])


def _seed_muls(path) -> int:
    """Mul nodes computed from lrp_target: the ones that run K-wide in a --targets explainer."""
    graph = onnx.load(str(path), load_external_data=False).graph
    reached, count = {"lrp_target"}, 0
    for node in graph.node:   # (stored in topological order)
        if any(i in reached for i in node.input):
            reached.update(node.output)
            count += node.op_type == "Mul"
    return count


def test_factors_made_once_under_targets(tmp_path, zoo_export, monkeypatch):
    """--targets: (ĝ·a)·c regrouped as ĝ·(a·c) (optimise.factors_once) gives the relevance of the graph
    without it, with fewer products over the K-wide ĝ; a single-target explainer is not touched."""
    entry = models.get("llama")
    _, proto = zoo_export("llama", "dynamo", None)
    fast, plain, single = tmp_path / "fast.onnx", tmp_path / "plain.onnx", tmp_path / "single.onnx"
    # one graph (not two under an If, nor the pass in a Loop over chunks of K), whose products _seed_muls counts
    lrpc.compile(proto, output=fast, targets="dynamic", causal_blocks=0, target_chunk=0)
    calls = []
    monkeypatch.setattr(optimise, "factors_once", lambda *a: calls.append(a) or 0)
    lrpc.compile(proto, output=plain, targets="dynamic", causal_blocks=0, target_chunk=0)
    lrpc.compile(proto, output=single, causal_blocks=0)
    assert len(calls) == 1   # the --targets compile only
    inputs = {k: v.numpy() for k, v in entry.inputs(2, 11, seed=4).items()}
    kw = dict(target=np.array([[1, 5, 2], [0, 3, 3]]), position=np.array([[-1, 3, 0], [5, -2, -1]]))
    a, b = (Explainer(p).explain(inputs, **kw).relevance["input_ids"] for p in (fast, plain))
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    assert _seed_muls(fast) < _seed_muls(plain)


def test_stacked_pair_is_the_two_products():
    """optimise.stacked_pair: (ĝ·a)·W_aᵀ + (ĝ·b)·W_bᵀ as one Gemm over [ĝ·a, ĝ·b] and the stacked weights equals
    numpy's sum of the two products; ĝ is read by one Mul, and one Gemm is left."""
    from onnx import TensorProto, helper
    k, seq, n, m = 3, 5, 8, 6
    rng = np.random.default_rng(5)
    w_a, w_b = rng.standard_normal((m, n), np.float32), rng.standard_normal((m, n), np.float32)
    nodes = [helper.make_node("Mul", ["g", "a"], ["ga"], name="lrp_Mul_a"),
             helper.make_node("Reshape", ["ga", "lrp_rows"], ["ra"], name="lrp_Reshape_a"),
             helper.make_node("Gemm", ["ra", "w_a"], ["pa"], transB=1, alpha=0.5, name="lrp_Gemm_a"),
             helper.make_node("Mul", ["b", "g"], ["gb"], name="lrp_Mul_b"),
             helper.make_node("Reshape", ["gb", "lrp_rows"], ["rb"], name="lrp_Reshape_b"),
             helper.make_node("Gemm", ["rb", "w_b", "pa"], ["s"], transB=1, alpha=0.5, name="lrp_Gemm_b"),
             helper.make_node("Identity", ["s"], ["y"], name="lrp_Identity")]
    inputs = [helper.make_tensor_value_info("g", TensorProto.FLOAT, [k, 1, seq, n]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, seq, n]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, seq, n])]
    inits = [numpy_helper.from_array(w_a, "w_a"), numpy_helper.from_array(w_b, "w_b"),
             numpy_helper.from_array(np.array([-1, n]), "lrp_rows")]
    graph = helper.make_graph(nodes, "pair", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    feed = {"g": rng.standard_normal((k, 1, seq, n), np.float32),
            "a": rng.standard_normal((1, seq, n), np.float32), "b": rng.standard_normal((1, seq, n), np.float32)}
    grads = optimise._computed_from([model.graph.inputs[0]])
    assert optimise.stacked_pair(model.graph, Builder(model.graph), grads) == 1
    model.graph.sort()
    got = _run_ir(model, feed)
    g = feed["g"].reshape(-1, n).astype(np.float64)
    expected = 0.5 * ((g * np.tile(feed["a"][0], (k, 1))) @ w_a.T + (g * np.tile(feed["b"][0], (k, 1))) @ w_b.T)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    assert [node.op_type for node in model.graph].count("Gemm") == 1
    assert [node.op_type for node in model.graph if model.graph.inputs[0] in node.inputs] == ["Unsqueeze"]


def test_stacked_pair_found_under_targets(tmp_path, zoo_export, monkeypatch):
    """--targets on a gated MLP (llama): gate and up ĝ come from one Gemm over stacked weights, and the
    relevance is the one without the rewrite."""
    entry = models.get("llama")
    _, proto = zoo_export("llama", "dynamo", None)
    fast, plain = tmp_path / "fast.onnx", tmp_path / "plain.onnx"
    found, rewrite = [], optimise.stacked_pair
    monkeypatch.setattr(optimise, "stacked_pair", lambda *a: found.append(rewrite(*a)) or found[-1])
    lrpc.compile(proto, output=fast, targets="dynamic", causal_blocks=0)
    monkeypatch.setattr(optimise, "stacked_pair", lambda *a: 0)
    lrpc.compile(proto, output=plain, targets="dynamic", causal_blocks=0)
    assert found and found[0] >= 1   # (the last layer's MLP runs on K rows, a shape of its own)
    inputs = {k: v.numpy() for k, v in entry.inputs(2, 11, seed=4).items()}
    kw = dict(target=np.array([[1, 5, 2], [0, 3, 3]]), position=np.array([[-1, 3, 0], [5, -2, -1]]))
    a, b = (Explainer(p).explain(inputs, **kw).relevance["input_ids"] for p in (fast, plain))
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp"])
def test_one_row_attention_equals_whole_rows(preset, tmp_path, zoo_export, monkeypatch):
    """ĝ kept as one sequence row through the last attention block (the query side) gives the relevance a
    walk with whole-width ĝ gives; and it is taken (softmax, the score and value products run on a row)."""
    entry = models.get("llama")
    _, proto = zoo_export("llama", "dynamo", None)
    rows, whole = tmp_path / "rows.onnx", tmp_path / "whole.onnx"
    seen = []
    row_plan = Rows.plan

    def spy(self, node, grads, form, params):
        plan = row_plan(self, node, grads, form, params)
        if plan is not None:
            seen.append((node.op_type, plan.axis))
        return plan
    monkeypatch.setattr(Rows, "plan", spy)
    lrpc.compile(proto, output=rows, preset=preset)
    expected = {("MatMul", 2), ("Transpose", 1)} | ({("Softmax", 2)} if preset == "attnlrp" else set())
    assert expected <= set(seen), seen  # (CP-LRP sends nothing into the softmax)
    monkeypatch.setattr(Rows, "plan", lambda self, node, grads, form, params: None)
    lrpc.compile(proto, output=whole, preset=preset)
    a, b = _run(rows, entry), _run(whole, entry)
    ref = b.relevance["input_ids"]
    assert np.abs(a.relevance["input_ids"] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_torchscript_export_needs_no_runtime_shape_arithmetic(tmp_path, zoo_export):
    """The legacy exporter builds every attention reshape from Shape ops; with symbolic shape inference and
    compile-time shape values the relevance graph undoes broadcasting and slicing statically, as for the
    dynamo export: no NonZero axis search, no clamping of slice bounds."""
    _, proto = zoo_export("llama", "legacy", None)
    path = tmp_path / "e.onnx"
    lrpc.compile(proto, output=path)
    ops = _ops(path)
    assert "NonZero" not in ops and "Min" not in ops and "Pad" not in ops, sorted(set(ops))


def test_symbolic_shape_inference_leaves_no_files(tmp_path, monkeypatch):
    """onnxruntime's shape inference tool saves `sym_shape_infer_temp.onnx` into the current directory when
    it cannot infer everything; lrpc runs its steps without that, and still gets the shapes it did infer."""
    from onnx import TensorProto, helper

    from lrpc.canonicalize import canonicalize
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["r"]),
             helper.make_node("Mystery", ["r"], ["m"], domain="example.custom"),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("m", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.custom", 1)])
    monkeypatch.chdir(tmp_path)
    out = canonicalize(model)
    assert list(tmp_path.iterdir()) == []
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert shapes["r"] == ["batch", 8]   # the Reshape to a run-time Shape, followed


def test_compile_writes_every_value_it_annotates(tmp_path, zoo_export, capfd, caplog):
    """Values lrpc annotates with a shape also carry a type: onnx-ir would otherwise drop them from the file
    with a warning on every compile (phi3's fused gate/up split leaves one-axis pads that stay)."""
    _, proto = zoo_export("phi3", "dynamo", None)
    lrpc.compile(proto, output=tmp_path / "e.onnx")
    captured = capfd.readouterr()
    assert "Skipping serialization" not in captured.out + captured.err + caplog.text
