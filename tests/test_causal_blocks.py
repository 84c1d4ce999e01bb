"""Causal self-attention in row blocks (lrpc/causal_blocks.py): the explainer holds the plain graph and the
blocked one and picks per run. Oracle: the plain explainer (`causal_blocks=0`), itself checked against torch
autograd (test_gxi_zoo.py) and the paper's equations (test_attnlrp_reference.py); the guard's decision is
read off the graph (the If's condition made an output) so each test knows which graph ran."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from lrpc.errors import LrpcError
from onnx_builders import masked_attention_model

T = 12


def _session(proto: onnx.ModelProto, *, with_guard: bool = False):
    if with_guard:   # the If's condition as one more output: which graph ran
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        branch = next(n for n in proto.graph.node if n.op_type == "If" and n.name == "lrp_causal_blocks")
        proto.graph.output.append(onnx.helper.make_tensor_value_info(branch.input[0], onnx.TensorProto.BOOL, []))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(proto, feed, *, with_guard=False):
    s = _session(proto, with_guard=with_guard)
    names = {i.name for i in s.get_inputs()}
    out = s.run(None, {k: v for k, v in feed.items() if k in names})
    return (out[:-1], bool(out[-1])) if with_guard else out


def _masks(batch=2):
    causal = np.where(np.tril(np.ones((T, T))) > 0, 0, -np.inf).astype(np.float32)
    minimum = np.where(causal < 0, np.finfo(np.float32).min, 0).astype(np.float32)
    left_padded = minimum.copy()[None].repeat(batch, 0)
    left_padded[1][:, :3] = np.finfo(np.float32).min   # row 1's first 3 tokens are padding: rows 0-2 see nothing
    sliding = np.where((np.tril(np.ones((T, T))) > 0) & (np.triu(np.ones((T, T)), -3) > 0), 0,
                       np.finfo(np.float32).min).astype(np.float32)
    return {  # name: (mask [batch, 1, T, T], whether the blocked graph may run)
        "causal -inf": (causal[None, None].repeat(batch, 0), True),
        "causal minimum": (minimum[None, None].repeat(batch, 0), True),
        "sliding window": (sliding[None, None].repeat(batch, 0), True),
        "left padded": (left_padded[:, None], False),
        "bidirectional": (np.zeros((batch, 1, T, T), np.float32), False),
        "one future key open": (np.where(np.arange(T)[None] == T - 1, 0, minimum)[None, None].repeat(batch, 0),
                                False),
    }


@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("preset", ["attnlrp", "cp-lrp", "gxi"])
def test_guard_picks_blocks_only_where_they_are_exact(mask_name, preset):
    model = masked_attention_model()
    guarded = lrpc.compile(model, preset=preset, attribute=["x"], causal_min_tokens=4)
    plain = lrpc.compile(model, preset=preset, attribute=["x"], causal_blocks=0)
    assert not any(n.op_type == "If" for n in plain.graph.node)
    mask, blocked = _masks()[mask_name]
    x = np.random.default_rng(3).normal(size=(2, T, 8)).astype(np.float32)
    feed = {"x": x, "mask": mask, "lrp_target": np.array([1, 4]), "lrp_position": np.array([-1, 6])}
    (out, took), want = _run(guarded, feed, with_guard=True), _run(plain, feed)
    assert took == blocked
    for got, expected in zip(out, want):
        assert np.isfinite(got).all() == np.isfinite(expected).all()
        scale = np.abs(expected[np.isfinite(expected)]).max()
        if blocked:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * scale)
        else:   # the plain graph itself
            np.testing.assert_array_equal(got, expected)
    assert np.abs(out[1]).sum() > 0   # a relevance that could differ


def test_short_sequences_run_the_plain_graph():
    model = masked_attention_model()
    guarded = lrpc.compile(model, attribute=["x"], causal_min_tokens=T + 1)
    mask, _ = _masks()["causal minimum"]
    feed = {"x": np.ones((2, T, 8), np.float32), "mask": mask, "lrp_target": np.array([0, 1]),
            "lrp_position": np.array([-1, -1])}
    assert _run(guarded, feed, with_guard=True)[1] is False


@pytest.mark.parametrize("name,exporter", [("llama", "dynamo"), ("llama", "legacy"), ("gpt2", "dynamo"),
                                           ("gpt2", "legacy"), ("qwen3", "dynamo")])
def test_zoo_causal_lms_blocked_equal_plain(zoo_export, name, exporter):
    """Single target and K = 3 targets, attnlrp: the blocked graph runs on causal inputs and equals the plain one."""
    from lrpc import models
    _, proto = zoo_export(name, exporter)
    inputs = {k: v.numpy() for k, v in models.get(name).inputs(2, T).items()}
    inputs["attention_mask"] = np.ones_like(inputs["input_ids"])   # causal, no padding: the blocks apply
    for targets, feed in [(None, {"lrp_target": np.array([3, 5]), "lrp_position": np.array([-1, 4])}),
                          (3, {"lrp_target": np.array([[3, 5, 7]] * 2), "lrp_position": np.array([[-1, 4, 0]] * 2)})]:
        guarded = lrpc.compile(proto, causal_min_tokens=4, targets=targets)
        plain = lrpc.compile(proto, causal_blocks=0, targets=targets)
        (out, took), want = _run(guarded, {**inputs, **feed}, with_guard=True), _run(plain, {**inputs, **feed})
        assert took
        for got, expected in zip(out, want):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_left_padding_falls_back_bit_for_bit(zoo_export):
    from lrpc import models
    _, proto = zoo_export("llama", "dynamo")
    inputs = {k: v.numpy() for k, v in models.get("llama").inputs(2, T).items()}
    inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :4] = 0
    feed = {**inputs, "lrp_target": np.array([3, 5]), "lrp_position": np.array([-1, -1])}
    (out, took), want = (_run(lrpc.compile(proto, causal_min_tokens=4), feed, with_guard=True),
                         _run(lrpc.compile(proto, causal_blocks=0), feed))
    assert not took
    for got, expected in zip(out, want):
        np.testing.assert_array_equal(got, expected)


def test_bidirectional_models_are_not_rewritten(zoo_export):
    """BERT's export expands its padding mask to [batch, 1, T, T] and ViT's adds a zero mask made from the
    pixels' shape: the compile-time probe (an unpadded input) finds them not causal, so no blocked graph is
    built; LLaMA's passes the probe."""
    from lrpc import causal_blocks
    from lrpc.compiler import load
    for name, causal in (("bert", False), ("hf-vit", False), ("llama", True)):
        model = load(zoo_export(name, "dynamo")[1])
        masks = [m.name for m in causal_blocks.mask_sources(causal_blocks.find(model.graph))]
        assert masks and causal_blocks.causal_unpadded(model.graph, masks, 4) is causal
        assert bool(causal_blocks.causal_masks(model.graph, 4)) == causal
    _, proto = zoo_export("bert", "dynamo")
    assert not any(n.op_type == "If" for n in lrpc.compile(proto, causal_min_tokens=4).graph.node)
    assert causal_blocks.causal_unpadded(load(masked_attention_model()).graph, ["mask"], 4) is None   # a float mask


def test_checker_and_metadata():
    explainer = lrpc.compile(masked_attention_model(), attribute=["x"], causal_blocks=4, causal_min_tokens=6)
    onnx.checker.check_model(explainer, full_check=True)
    from lrpc import contract
    info = contract.read_metadata({p.key: p.value for p in explainer.metadata_props})
    assert info["causal_blocks"] == {"blocks": 4, "min_tokens": 6}


@pytest.mark.parametrize("blocks,min_tokens", [(1, 8), (-2, 8), ("x", 8), (65, 100), (4, 0), (True, 8)])
def test_bad_options_are_refused(blocks, min_tokens):
    with pytest.raises(LrpcError, match="causal"):
        lrpc.compile(masked_attention_model(), attribute=["x"], causal_blocks=blocks, causal_min_tokens=min_tokens)


@pytest.mark.parametrize("options,feed,blocked", [
    ({"seed": "vector"}, {"lrp_seed": "vector"}, True),
    ({"targets": "dynamic"}, {"lrp_target": np.array([[3, 5], [1, 2]]), "lrp_position": np.array([[-1, 2], [4, -3]])},
     True),
    ({"components": "mlp,residual", "intervene": "mlp"}, {}, True),
    ({"conditions": "mlp"}, {}, True),
    ({"components": "heads"}, {}, False),      # a head's unit is the product the blocks cut apart
    ({"checkpoint": "auto"}, {}, True),
    ({"embeddings_input": True}, {}, True),
    ({"latent": "linear"}, {}, True),
    ({"latent": "add"}, {}, False),            # matches the masked scores, which the blocks replace
    ({"preset": "cp-lrp", "forward": "shared"}, {}, True),
    ({"forward": "copy"}, {}, False),          # the outputs come from the untouched forward
], ids=["seed-vector", "targets", "components", "conditions", "heads", "checkpoint", "embeddings", "latent",
        "latent-scores", "cp-lrp", "forward-copy"])
def test_blocks_with_every_compile_option(zoo_export, options, feed, blocked):
    """The blocked graph builds, runs and equals the plain one whatever else the explainer was compiled with;
    where the blocks cannot serve an option, the explainer is the plain one alone."""
    from lrpc import models
    _, proto = zoo_export("llama", "dynamo")
    inputs = {k: v.numpy() for k, v in models.get("llama").inputs(2, T).items()}
    inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
    guarded = lrpc.compile(proto, causal_min_tokens=4, **options)
    plain = lrpc.compile(proto, causal_blocks=0, **options)
    if not blocked:
        assert not any(n.op_type == "If" for n in guarded.graph.node)
        return
    session = _session(plain)
    full = {**inputs, "lrp_target": np.array([3, 5]), "lrp_position": np.array([-1, 4]), **feed}
    for i in session.get_inputs():
        if i.name.startswith("inputs_embeds."):   # --embeddings-input: the looked-up embeddings as an input
            full[i.name] = np.random.default_rng(0).normal(size=(2, T, i.shape[-1])).astype(np.float32)
        if isinstance(full.get(i.name), str):   # --seed vector: one seed vector per row
            full[i.name] = np.random.default_rng(1).normal(size=(2, i.shape[-1])).astype(np.float32)
    (out, took), want = _run(guarded, full, with_guard=True), _run(plain, full)
    assert took
    for got, expected in zip(out, want):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(np.abs(expected).max(), 1e-30))
