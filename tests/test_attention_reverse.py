"""The attention reverse of grouped-query models (docs/design.md, "The attention reverse"): ĝ of the keys and
values a group of query heads shares is one product per group, and under --targets the last layer's
attention stays K rows. Llama-style models with 4 query heads over 2 and over 1 key/value heads (group
sizes 2 and 4), both exporters. Oracles: transformers' own Llama run with the AttnLRP rules patched in
(tests/reference_lrp.py, which repeats K/V with repeat_interleave, not the model's repeat_kv), torch
autograd for gxi, and the single-target explainer for every row of a K run."""

from __future__ import annotations

import numpy as np
import pytest

import lrpc
from lrpc.models import zoo
from oracles import input_x_gradient, relative_error

import reference_lrp as ref

GROUPS = {2: "llama", 4: "llama-gqa4"}   # group size → zoo entry (the zoo's llama has 2 kv heads)
GQA4 = zoo.ZooEntry("llama-gqa4", "llama", zoo._DEC, zoo._decoder("LlamaForCausalLM", "LlamaConfig",
                                                                  num_key_value_heads=1), zoo._tok)
CASES = [pytest.param(group, exporter, id=f"group{group}-{exporter}") for group in GROUPS
         for exporter in ("dynamo", "legacy")]


@pytest.fixture(scope="module")
def gqa4():
    module, _ = GQA4.build()
    return module, {}


def _model(group, exporter, zoo_export, gqa4):
    """(torch module, ONNX proto, entry)."""
    if group == 2:
        module, proto = zoo_export("llama", exporter)
        return module, proto, zoo.get("llama")
    module, protos = gqa4
    if exporter not in protos:
        protos[exporter] = GQA4.export(exporter=exporter, module=module)
    return module, protos[exporter], GQA4


@pytest.mark.parametrize("group,exporter", CASES)
def test_grouped_query_attention(group, exporter, zoo_export, gqa4):
    module, proto, entry = _model(group, exporter, zoo_export, gqa4)
    inputs = entry.inputs(2, 9, seed=7)
    feed = {k: v.numpy() for k, v in inputs.items()}
    target, position = np.array([5, 100]), np.array([1, -2])
    # single target, attnlrp: the paper's rules on transformers' own model
    single = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp"))
    got = single.explain(feed, target=target, position=position).relevance["input_ids"]
    assert relative_error(got, ref.embedding_relevance(module, inputs, target, position, ref.llama_attnlrp())) <= 1e-4
    # single target, gxi: torch autograd
    gxi = lrpc.Explainer(lrpc.compile(proto, preset="gxi")).explain(feed, target=target, position=position)
    assert relative_error(gxi.relevance["input_ids"],
                          input_x_gradient(module, inputs, "input_ids", target, position)) <= 1e-4
    # K rows, each equal to the single-target explainer (the last layer's attention runs on the K rows)
    for preset in ("attnlrp", "cp-lrp"):
        one = single if preset == "attnlrp" else lrpc.Explainer(lrpc.compile(proto, preset=preset))
        many = lrpc.Explainer(lrpc.compile(proto, preset=preset, targets="dynamic"))
        targets, positions = np.array([[5, 100, 7], [1, 2, 3]]), np.array([[1, -2, -1], [-1, 0, 4]])
        rows = many.explain(feed, target=targets, position=positions).relevance["input_ids"]
        for k in range(targets.shape[1]):
            want = one.explain(feed, target=targets[:, k], position=positions[:, k]).relevance["input_ids"]
            assert np.abs(want).max() > 0
            assert relative_error(rows[:, k], want) <= 1e-5, (preset, k)
