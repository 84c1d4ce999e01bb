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
    into a Concat): the same relevance, and the ops they remove are gone."""
    entry = models.get("llama")
    _, proto = zoo_export("llama", "dynamo", None)
    fast, plain = tmp_path / "fast.onnx", tmp_path / "plain.onnx"
    lrpc.compile(proto, output=fast, causal_blocks=0)   # (the plain graph's ops, not inside an If)
    for name in ("scale_into_gemm", "accumulate_in_gemm", "pads_to_concat"):
        monkeypatch.setattr(optimise, name, lambda *a: 0)
    lrpc.compile(proto, output=plain, causal_blocks=0)
    a, b = _run(fast, entry), _run(plain, entry)
    ref = b.relevance["input_ids"]
    assert np.abs(a.relevance["input_ids"] - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(a.outputs["logits"], b.outputs["logits"])
    fast_ops, plain_ops = _ops(fast), _ops(plain)
    assert fast_ops.count("Pad") == 0 < plain_ops.count("Pad")          # rotary rotate_half: Concat instead
    assert fast_ops.count("Sum") < plain_ops.count("Sum")               # q/k/v and gate/up ĝ summed in Gemm C
    graph = onnx.load(str(fast), load_external_data=False).graph
    assert any(n.op_type == "Gemm" and len(n.input) == 3 for n in graph.node)
    assert any(n.op_type == "Gemm" and any(a.name == "alpha" and a.f == 0.5 for a in n.attribute) for n in graph.node)


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
