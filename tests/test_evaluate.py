"""Faithfulness evaluation (lrpc/evaluate.py) and the embeddings-input explainer (lrpc/embeddings.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc import evaluate as ev
from lrpc.cli import main
from tests.onnx_builders import token_model


def additive_model(vocab=30, hidden=6, classes=3, seed=0) -> onnx.ModelProto:
    """ids → E[ids] → x W → sum over tokens → [batch, classes]: each token adds its own exact share."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(vocab, hidden)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.normal(size=(hidden, classes)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("MatMul", ["emb", "W"], ["per_token"]),
             helper.make_node("ReduceSum", ["per_token", "axis"], ["logits"], keepdims=0)]
    graph = helper.make_graph(nodes, "additive",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# ---- metrics -----------------------------------------------------------------------------------

def test_abpc_and_aopc_on_known_curves():
    morf = np.array([[1.0, 0.0, 0.0]])
    lerf = np.array([[1.0, 1.0, 0.0]])
    assert ev.abpc(morf, lerf) == pytest.approx(0.5)      # trapezoid over [0, 1]
    assert ev.aopc(morf) == pytest.approx(2 / 3)
    assert ev.aopc(lerf) == pytest.approx(1 / 3)
    assert list(ev.removal_counts(7, 2)) == [0, 4, 7]


def test_topk_recovery():
    assert ev.topk_recovery(np.array([0.1, 3.0, -1.0, 2.0]), [1, 3])
    assert not ev.topk_recovery(np.array([0.1, 3.0, -1.0, 2.0]), [0, 1])


def test_oracle_ordering_beats_random_on_an_additive_model(tmp_path):
    """On a model whose output is a sum of per-token terms, LRP's relevance is each token's exact share, so its
    MoRF/LeRF orders are the oracle's: its ABPC must beat random's; IG equals Input×Gradient there."""
    evaluator = ev.Evaluator(additive_model(), workdir=tmp_path)
    rng = np.random.default_rng(1)
    examples = [ev.Example({"input_ids": rng.integers(0, 30, size=(1, 9))}, target=int(rng.integers(0, 3)))
                for _ in range(12)]
    results = ev.evaluate(evaluator, examples, ["attnlrp", "gxi", "ig", "random"], steps=9, keep_relevance=True)
    assert results.abpc("attnlrp") > results.abpc("random") + 0.5
    assert results.abpc("attnlrp") == pytest.approx(results.abpc("gxi"), abs=1e-5)
    for a, b in zip(results.relevances["ig"], results.relevances["gxi"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the oracle: each token's exact contribution E[id] W[:, target]
    m = additive_model()
    E, W = (numpy_helper.to_array(t) for t in m.graph.initializer[:2])
    ex = examples[0]
    np.testing.assert_allclose(results.relevances["attnlrp"][0], (E[ex.inputs["input_ids"][0]] @ W)[:, ex.target],
                               rtol=1e-4, atol=1e-5)
    # perfect order: the MoRF curve ends where the LeRF curve ends (everything removed → 0 for zero embeddings)
    assert results.morf["attnlrp"][:, -1] == pytest.approx(0.0, abs=1e-5)
    assert results.markdown().count("|") > 10
    assert results.plot(tmp_path / "curves.png").stat().st_size > 1000


# ---- embeddings input --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp", "gxi"])
def test_embeddings_input_explainer_equals_ids_explainer(preset):
    model = token_model()
    ids = np.random.default_rng(0).integers(0, 20, size=(2, 5))
    by_ids = lrpc.Explainer(lrpc.compile(model, preset=preset))
    by_embeds = lrpc.Explainer(lrpc.compile(model, preset=preset, embeddings_input=True))
    assert by_embeds.model_inputs == ["input_ids", "inputs_embeds.input_ids"]
    assert by_embeds.meta["embeddings_input"] == {"inputs_embeds.input_ids": "input_ids"}
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))
    a = by_ids.explain({"input_ids": ids}, target=[1, 2])
    b = by_embeds.explain({"input_ids": ids, "inputs_embeds.input_ids": table[ids]}, target=[1, 2])
    assert b.relevance["input_ids"].shape == (2, 5)
    np.testing.assert_allclose(a.relevance["input_ids"], b.relevance["input_ids"], atol=1e-5)
    np.testing.assert_allclose(a.outputs["logits"], b.outputs["logits"], atol=1e-5)
    # zero embeddings are now expressible
    zero = by_embeds.forward({"input_ids": ids, "inputs_embeds.input_ids": np.zeros_like(table[ids])})
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b3"))
    np.testing.assert_allclose(zero["logits"], np.broadcast_to(bias, zero["logits"].shape), atol=1e-6)


def test_embeddings_input_errors_on_a_float_model():
    from tests.onnx_builders import float_model
    with pytest.raises(lrpc.LrpcError, match="embeddings-input"):
        lrpc.compile(float_model(), embeddings_input=True)


def test_embeddings_input_on_a_trained_style_transformer(zoo_export):
    """BERT (attention, masks, positions from the ids' shape): ids and embeddings explainers agree."""
    _, proto = zoo_export("bert")
    from models.zoo import token_inputs
    inputs = {k: v.numpy() for k, v in token_inputs(2, 7).items()}
    by_ids = lrpc.Explainer(lrpc.compile(proto))
    by_embeds = lrpc.Explainer(lrpc.compile(proto, embeddings_input=True))
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and "word_embeddings" in n.input[0])
    table = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == gather.input[0]))
    a = by_ids.explain(inputs, target=[0, 1])
    b = by_embeds.explain({**inputs, "inputs_embeds.input_ids": table[inputs["input_ids"]]}, target=[0, 1])
    np.testing.assert_allclose(a.relevance["input_ids"], b.relevance["input_ids"], atol=1e-5)


def test_rollout_and_all_methods_on_bert(zoo_export, tmp_path):
    _, proto = zoo_export("bert")
    from models.zoo import token_inputs
    evaluator = ev.Evaluator(proto, workdir=tmp_path)
    assert len(evaluator.attention) == 2  # one attention softmax per layer
    inputs = {k: v.numpy() for k, v in token_inputs(2, 7).items()}
    examples = [ev.Example({k: v[i:i + 1] for k, v in inputs.items()}, target=0) for i in range(2)]
    results = ev.evaluate(evaluator, examples, ev.METHODS, steps=4, keep_relevance=True)
    assert results.relevances["rollout"][1].shape == (5,)  # the padded row has 5 real tokens
    assert all(np.isfinite(results.abpc(m)) for m in ev.METHODS)


# ---- command line ------------------------------------------------------------------------------

def test_cli_compile_embeddings_input_and_evaluate(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    onnx.save(additive_model(), model_path)
    assert main(["compile", str(model_path), "-o", str(tmp_path / "e.onnx"), "--embeddings-input"]) == 0
    assert "inputs_embeds.input_ids" in lrpc.Explainer(tmp_path / "e.onnx").model_inputs
    np.savez(tmp_path / "inputs.npz", input_ids=np.random.default_rng(0).integers(0, 30, size=(4, 6)))
    code = main(["evaluate", str(model_path), "--inputs", str(tmp_path / "inputs.npz"), "--methods", "attnlrp",
                 "random", "--replace", "pad", "--replace-id", "0", "--plot", str(tmp_path / "c.png"),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert "AttnLRP" in capsys.readouterr().out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["examples"] == 4 and set(summary["methods"]) == {"attnlrp", "random"}
    assert (tmp_path / "c.png").stat().st_size > 1000
    code = main(["evaluate", str(model_path), "--inputs", str(tmp_path / "inputs.npz"), "--methods", "random",
                 "--replace", "pad", "--replace-id", "0", "--json"])   # --json alone: stdout, as in explain/bench
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["examples"] == 4 and "Random" in err
    assert main(["evaluate", str(model_path), "--inputs", str(tmp_path / "missing.npz")]) == 2


# ---- several targets per input -----------------------------------------------------------------

def test_several_targets_make_one_run_and_equal_the_per_target_loop(zoo_export, tmp_path):
    """An example with K targets: one run of the many-targets explainer per method (not K), and the same
    relevances and curves as K one-target examples (themselves checked against autograd elsewhere)."""
    _, proto = zoo_export("llama")
    from models.zoo import token_inputs
    evaluator = ev.Evaluator(proto, workdir=tmp_path, ig_steps=4)
    inputs = {k: v.numpy() for k, v in token_inputs(2, 7).items()}
    rows = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(2)]
    targets = [[3, 7, 11], [0, 5, 2]]
    methods = ["attnlrp", "gxi", "ig", "random"]
    runs = []
    for preset, many in (("attnlrp", False), ("gxi", False), ("attnlrp", True), ("gxi", True)):
        explainer = evaluator.explainer(preset, many)
        explainer._run = (lambda run, key: lambda names, feed: runs.append(key) or run(names, feed))(
            explainer._run, (preset, many))
    many = ev.evaluate(evaluator, [ev.Example(r, target=t) for r, t in zip(rows, targets)], methods, steps=3,
                       keep_relevance=True)
    assert sorted(runs) == sorted([("attnlrp", True), ("gxi", True), ("gxi", True)] * 2)  # gxi, then IG's run
    runs.clear()
    loop = ev.evaluate(evaluator, [ev.Example(r, target=t) for r, ts in zip(rows, targets) for t in ts], methods,
                       steps=3, keep_relevance=True)
    assert len(runs) == 3 * 6 and many.n == loop.n == 6
    for m in methods:
        for got, expected in zip(many.relevances[m], loop.relevances[m], strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(many.morf[m], loop.morf[m], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(many.lerf[m], loop.lerf[m], rtol=1e-5, atol=1e-6)


def test_cli_evaluate_several_targets_per_input(tmp_path, capsys):
    """--top-k and an [examples, K] lrp_target: each target its own curves; the relevance of the additive
    model (token t adds E[t]·W[:, c] to class c) is known in closed form."""
    model = additive_model()
    model_path = tmp_path / "m.onnx"
    onnx.save(model, model_path)
    ids = np.random.default_rng(0).integers(0, 30, size=(4, 6))
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    np.savez(tmp_path / "targets.npz", input_ids=ids, lrp_target=np.array([[0, 2], [1, 0], [2, 1], [0, 1]]))
    for source, extra in (("ids.npz", ["--top-k", "2"]), ("targets.npz", [])):
        code = main(["evaluate", str(model_path), "--inputs", str(tmp_path / source), "--methods", "attnlrp",
                     "random", "--json", *extra])
        out, _ = capsys.readouterr()
        assert code == 0 and json.loads(out)["examples"] == 8, source
    assert main(["evaluate", str(model_path), "--inputs", str(tmp_path / "targets.npz"), "--top-k", "2"]) == 2
    assert "both choose targets" in capsys.readouterr().err
    table, weights = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    evaluator = ev.Evaluator(model, workdir=tmp_path / "work")
    results = ev.evaluate(evaluator, [ev.Example({"input_ids": ids[:1]}, target=[2, 0])], ["attnlrp"], steps=2,
                          keep_relevance=True)
    expected = table[ids[0]] @ weights[:, [2, 0]]   # [tokens, targets]
    np.testing.assert_allclose(np.array(results.relevances["attnlrp"]), expected.T, rtol=1e-5)
    with pytest.raises(lrpc.LrpcError, match="empty list of targets"):
        ev.Example({"input_ids": ids[:1]}, target=[])


@pytest.mark.parametrize("target,message", [
    ([[1, 2]], "a class index or a list of them, got [[1, 2]]"),
    ([1.5], "a class index or a list of them, got [1.5]"),
    ([True, 2], "a class index or a list of them"),
    ("abc", "target 'abc' must be a whole number"),
    (2.0, "target 2.0 must be a whole number"),
    ([], "empty list of targets"),
])
def test_an_example_refuses_targets_that_are_not_class_indices(target, message):
    """Not truncated to an int, not a nested list read as indices, not an IndexError later on."""
    with pytest.raises(lrpc.LrpcError, match=re.escape(message)) as err:
        ev.Example({"input_ids": np.ones((1, 3), np.int64)}, target=target)
    assert "\n" not in str(err.value)
