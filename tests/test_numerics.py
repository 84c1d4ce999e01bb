"""Issue 8 numerics: no NaN or Inf in any relevance output — −inf attention masks, fully masked rows, zeros in
the activation rule's denominator, fp16 / bf16 models (relevance in float32), sequences as long as the position
table — for every zoo model."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc

torch = pytest.importorskip("torch")

from lrpc import models  # noqa: E402

import reference_lrp as ref  # noqa: E402

TOKEN_MODELS = [n for n in models.names() if "input_ids" in models.get(n).attributed]
IMAGE_MODELS = [n for n in models.names() if n not in TOKEN_MODELS]


def finite(result):
    for name, r in result.relevance.items():
        assert r.dtype == np.float32, name
        assert np.all(np.isfinite(r)), (name, r)


# ---- −inf masks in the graph and as a float input ----------------------------------------------------------

def _masked_scores_model():
    """scores x [b, 5] + additive float mask [b, 5] (−inf = masked) → softmax → ⊙ x → linear."""
    W = numpy_helper.from_array(np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("Mul", ["p", "x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5]),
                                                helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [W])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("preset", ["attnlrp", "gxi", "cp-lrp"])
def test_minus_inf_mask_input_and_latent_scores(preset):
    """A −inf mask value receives ĝ = 0: its relevance must be 0, not −inf · 0 = NaN (also for the masked
    scores as a latent)."""
    explainer = lrpc.Explainer(lrpc.compile(_masked_scores_model(), preset=preset, latent="^s$"))
    x = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
    mask = np.zeros((2, 5), np.float32)
    mask[:, 3:] = -np.inf
    result = explainer.explain({"x": x, "mask": mask}, target=[0, 2])
    finite(result)
    assert np.all(result.relevance["mask"][:, 3:] == 0) and np.all(result.relevance["s"][:, 3:] == 0)
    assert np.all(result.relevance["x"][:, 3:] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_minus_inf_attention_at_position_zero(causal):
    """Row 0 of a causal mask keeps one score; everything else is −inf (the reference masks with −inf)."""
    torch.manual_seed(0)
    block = ref.Attention(8, 2, causal=causal, rotary=True)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(ref.exportable(block), (torch.randn(1, 4, 8),), buffer, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}}, dynamo=False, opset_version=18)
    explainer = lrpc.Explainer(lrpc.compile(onnx.load_from_string(buffer.getvalue()), latent="Softmax|MatMul"))
    for seq in (1, 2, 7):
        x = np.random.default_rng(seq).normal(size=(2, seq, 8)).astype(np.float32)
        finite(explainer.explain({"x": x}, target=[0, 5], position=[0, -1]))


# ---- zeros in the identity rule's denominator ----------------------------------------------------------------

@pytest.mark.parametrize("block", ["gated-mlp", "gelu-mlp", "gelu-tanh-mlp"])
def test_zero_activation_inputs(block):
    """u = 0 exactly (zero input, no bias): ĝ_u = ĝ_v · v / (0 + ε) with v = f(0) = 0 — finite, and 0."""
    makers = {"gated-mlp": lambda: ref.GatedMLP(8, 12, bias=False),
              "gelu-mlp": lambda: ref.GeluMLP(8, 12, bias=False),
              "gelu-tanh-mlp": lambda: ref.GeluMLP(8, 12, bias=False, approximate="tanh")}
    torch.manual_seed(1)
    module = makers[block]().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(ref.exportable(module), (torch.randn(1, 3, 8),), buffer, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}}, dynamo=False, opset_version=18)
    explainer = lrpc.Explainer(lrpc.compile(onnx.load_from_string(buffer.getvalue())))
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    x[0] = 0.0           # a whole zero row
    x[1, 1, :4] = 0.0    # and scattered zeros next to nonzero values
    x[1, 2] = 1e-30      # denormal-scale inputs
    result = explainer.explain({"x": x}, target=[1, 2], position=[-1, 1])
    finite(result)
    assert np.all(result.relevance["x"][0] == 0)
    want, _ = ref.relevance(module, torch.tensor(x), [1, 2], [-1, 1])
    np.testing.assert_allclose(result.relevance["x"], want.numpy(), atol=1e-5 * max(1.0, float(want.abs().max())))


# ---- every zoo model: fully masked rows, padding, position-table-long sequences ----------------------------------

def _max_positions(module) -> int:
    config = module.hf_model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 64)


@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_zoo_token_models_masks_and_long_sequences(name, zoo_export):
    module, proto = zoo_export(name)
    entry = models.get(name)
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp"))
    rank = explainer.meta["rank"]
    longest = min(_max_positions(module), 128) - (2 if entry.family == "roberta" else 0)  # padding offset
    for batch, seq, masking in ((3, 7, "rows"), (2, longest, "pad"), (1, 1, "none")):
        inputs = {k: v.numpy() for k, v in entry.inputs(batch, seq, seed=seq).items()}
        if "attention_mask" in inputs:
            mask = np.ones_like(inputs["attention_mask"])
            if masking == "rows":
                mask[1] = 0                      # a fully masked row
                mask[2, seq // 2:] = 0           # a padded row
            elif masking == "pad":
                mask[1, 1:] = 0                  # only the first token is real
            inputs["attention_mask"] = mask
        position = np.zeros(batch, np.int64) if rank == 3 else None
        result = explainer.explain(inputs, target=np.arange(batch) % 3, position=position)
        assert all(np.all(np.isfinite(v)) for v in result.outputs.values()), (name, seq, masking)
        finite(result)
        if rank == 3:  # and at the last position as well
            finite(explainer.explain(inputs, target=np.ones(batch, np.int64), position=np.full(batch, -1)))
    if entry.family in ("bert", "roberta", "distilbert", "gpt2") and _max_positions(module) <= 128:  # learned table
        inputs = {k: v.numpy() for k, v in entry.inputs(1, longest + 1).items()}
        with pytest.raises(lrpc.LrpcError) as info:
            explainer.explain(inputs, target=[0], position=[0] if rank == 3 else None)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_zoo_image_models_extreme_inputs(name, zoo_export):
    module, proto = zoo_export(name)
    entry = models.get(name)
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp"))
    pixels = entry.inputs(3, None, seed=0)["pixel_values"].numpy()
    pixels[0] = 0.0          # a black image: zero activation inputs everywhere in the first layer
    pixels[1] *= 1e3         # saturating
    finite(explainer.explain({"pixel_values": pixels}, target=[0, 1, 2]))


# ---- fp16 / bf16 models ---------------------------------------------------------------------------------------

def _legacy_export(module, inputs, output="logits"):
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (), buffer, kwargs=dict(inputs), input_names=list(inputs), output_names=[output],
                          dynamic_axes={k: {0: "b", 1: "s"} for k in inputs}, dynamo=False, opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_fp16_models_give_float32_relevance_close_to_fp32(name):
    entry = models.get(name)
    module, example = entry.build()
    fp32 = lrpc.Explainer(lrpc.compile(_legacy_export(module, example)))
    fp16 = lrpc.Explainer(lrpc.compile(_legacy_export(module.half(), example)))
    assert fp16.inputs["input_ids"].type == "tensor(int64)"
    rank = fp32.meta["rank"]
    for batch, seq, seed in ((2, 7, 0), (2, 40, 1)):
        inputs = {k: v.numpy() for k, v in entry.inputs(batch, seq, seed=seed).items()}
        kwargs = dict(target=[1, 2], position=[-1, 3] if rank == 3 else None)
        a, b = fp32.explain(inputs, **kwargs), fp16.explain(inputs, **kwargs)
        assert b.outputs["logits"].dtype == np.float16
        finite(b)
        got, want = b.relevance["input_ids"], a.relevance["input_ids"]
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 0.05, (name, seq, err)


def test_bf16_model_compiles_with_float32_relevance():
    """onnxruntime's CPU provider has no bf16 kernels, so this checks the graph: relevance is computed and
    output in float32 (forward values are cast up); with CUDA it also runs the explainer."""
    entry = models.get("llama")
    module, example = entry.build()
    proto = lrpc.compile(_legacy_export(module.to(torch.bfloat16), example))
    outputs = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert outputs["logits"] == TensorProto.BFLOAT16 and outputs["relevance.input_ids"] == TensorProto.FLOAT
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return
    explainer = lrpc.Explainer(proto)
    inputs = {k: v.numpy() for k, v in entry.inputs(2, 9).items()}
    finite(explainer.explain(inputs, target=[1, 2], position=[-1, 2]))
