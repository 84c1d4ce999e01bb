"""Mixture-of-experts and encoder–decoder models (issue 16): MoE exported through transformers' batched_mm
experts, AttnLRP on Qwen3-MoE against the independent reference (transformers' own modules run with the
rules, as LXT's `qwen3_moe` map does), plans that name the routing, and both token inputs of T5 / BART
attributed. (gxi = autograd for the zoo families is in test_gxi_zoo.py, plan counts in test_golden_plans.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import lrpc
from lrpc import models
from lrpc.compiler import plan_document

import reference_lrp as ref  # tests/ is on sys.path (pytest's default prepend import mode)
from oracles import relative_error

TOL_LXT = 1e-3  # issue 16: attnlrp vs the LXT-equivalent reference


def _reference_relevance(module, inputs, target, position) -> np.ndarray:
    """Σ_hidden E ⊙ ĝ_E of the embedding output with the reference's AttnLRP rules patched in."""
    return ref.embedding_relevance(module, inputs, target, position, ref.qwen3_moe_attnlrp())


def _attnlrp_vs_reference(module, proto, tmp_path):
    path = tmp_path / "explainer.onnx"
    lrpc.compile(proto, preset="attnlrp", output=path)
    explainer = lrpc.Explainer(path)
    entry = models.get("qwen3-moe")
    errors = []
    for seq, seed in ((7, 1234), (11, 99)):
        inputs = entry.inputs(2, seq, seed=seed)
        target, position = np.array([5, 100]), np.array([1, -2])
        got = explainer.explain({k: v.numpy() for k, v in inputs.items()}, target=target,
                                position=position).relevance["input_ids"]
        want = _reference_relevance(module, inputs, target, position)
        assert np.all(np.isfinite(got))
        errors.append(relative_error(got, want))
    return max(errors)


def test_qwen3_moe_attnlrp_equals_reference(zoo_export, tmp_path):
    """Renormalised routing weights (as Qwen3-30B-A3B ships): their division by the sum is a softmax over
    the chosen experts' logits, so it keeps its exact gradient, as in LXT's map (the router unpatched)."""
    module, proto = zoo_export("qwen3-moe")
    assert _attnlrp_vs_reference(module, proto, tmp_path) <= TOL_LXT


def test_qwen3_moe_attnlrp_equals_reference_without_renormalisation(zoo_export, tmp_path):
    from lrpc.torch_export import export_onnx
    module, _ = zoo_export("qwen3-moe")
    entry = models.get("qwen3-moe")
    routers = [sub for sub in module.modules() if hasattr(sub, "norm_topk_prob")]
    try:
        for router in routers:
            router.norm_topk_prob = False
        proto = export_onnx(module, entry.inputs(*entry.example_shape), exporter="legacy")  # the fast one
        assert _attnlrp_vs_reference(module, proto, tmp_path) <= TOL_LXT
    finally:
        for router in routers:
            router.norm_topk_prob = True


def test_export_restores_the_experts_implementation():
    from lrpc.torch_export import export_onnx
    module, example = models.get("mixtral").build()
    before = module.hf_model.get_experts_implementation()
    proto = export_onnx(module, example, exporter="legacy")
    assert module.hf_model.get_experts_implementation() == before == {"": "grouped_mm"}
    assert "TopK" in {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("name", ["qwen3-moe", "qwen2-moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("exporter,opset", [("dynamo", None), ("legacy", 17)])
def test_plan_names_the_routing(name, exporter, opset, zoo_export):
    """Each MoE layer's routed product is one uniform (bilinear) row that says how many experts it routes."""
    _, proto = zoo_export(name, exporter, opset)
    rows = plan_document(proto, "attnlrp")["rows"]
    routed = [r for r in rows if r["notes"].get("routing")]
    assert [r["notes"]["routing"] for r in routed] == ["top-2 of 4 experts"] * 2  # two layers
    assert {r["rule"] for r in routed} == {"uniform"}


# ---- encoder–decoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_attributes_both_sides_of_one_shared_table(name, zoo_export):
    """Source and target ids are two lookups of the same embedding matrix; relative position bias (T5) and
    learned positions (BART) are made from positions only and carry nothing."""
    from lrpc.analysis import find_attributions, relevance_carrying
    from lrpc.compiler import load
    _, proto = zoo_export(name)
    graph = load(proto).graph
    attributions = {a.input.name: a for a in find_attributions(graph)}
    assert set(attributions) == {"input_ids", "decoder_input_ids"}
    tables = {a.input.name: {p.producer().inputs[0].name for p in a.points} for a in attributions.values()}
    assert len(tables["input_ids"]) == 1 and tables["input_ids"] == tables["decoder_input_ids"]
    carrying = relevance_carrying(graph, {p for a in attributions.values() for p in a.points})
    lookups = [n for n in graph if n.op_type == "Gather" and n.inputs[0].is_initializer()
               and n.inputs[0].name not in tables["input_ids"]]
    assert lookups, "expected position-table lookups"
    assert not any(n.outputs[0] in carrying for n in lookups)


def test_attributor_explains_the_last_decoder_position(zoo_export, tmp_path):
    """`lrpc explain` / Attributor on a seq2seq model: positions index the decoder side (default its last
    token), both sides get their own relevance at their own length, and text is the source with the
    decoder's start token as the target prefix (from the folder's config.json)."""
    import json

    import onnx
    entry = models.get("t5")
    _, proto = zoo_export("t5")
    onnx.save(proto, tmp_path / "t5.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"decoder_start_token_id": 0}))
    attributor = lrpc.Attributor(str(tmp_path / "t5.onnx"), tokenizer="toy", cache=tmp_path / "cache")
    inputs = {k: v.numpy() for k, v in entry.inputs(1, 6, seed=3).items()}  # 6 source, 4 target tokens
    got = attributor.attribute(inputs, target=5)
    assert got.position == 3
    assert got.relevances["input_ids"].shape == (6,) and got.relevances["decoder_input_ids"].shape == (4,)
    direct = lrpc.Explainer(lrpc.compile(proto)).explain(inputs, target=[5], position=[3])
    for name in ("input_ids", "decoder_input_ids"):
        assert relative_error(got.relevances[name], direct.relevance[name][0]) <= 1e-5
    text = attributor.attribute("the cat sat on the mat", target=5)
    assert text.position == 0 and text.relevances["decoder_input_ids"].shape == (1,)
    assert text.relevances["input_ids"].shape == (len(text.tokens),)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_a_mixture_of_experts_without_a_traceable_implementation_is_refused(exporter):
    """Switch Transformers (an encoder–decoder MoE) loops over the experts its routing picked and has no
    batched_mm implementation: torch.export fails on it, and TorchScript would bake the example's routing
    into the graph (onnxruntime then fails on other inputs) — refused in one line before either runs."""
    import transformers

    from lrpc import hf
    from lrpc.frontend import torch_to_onnx
    config = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2,
        num_sparse_decoder_layers=1, num_heads=4, num_experts=4, expert_capacity=8, decoder_start_token_id=0)
    model = transformers.SwitchTransformersForConditionalGeneration._from_config(config).eval()
    with pytest.raises(lrpc.LrpcError) as err:
        torch_to_onnx(hf.HFSeq2SeqModel(model), hf.seq2seq_inputs(1, 5, vocab=64), exporter=exporter)
    message = str(err.value)
    assert "SwitchTransformersSparseMLP runs its experts in a data-dependent loop" in message and "\n" not in message
