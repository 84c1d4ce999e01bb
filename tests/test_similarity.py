"""Similarity for any encoder (`lrpc explain ENCODER --text A --similar-to B`, `lrpc.Similarity`,
`Attributor.similarity`), the refusal of randomly initialised heads, and the encoder's default target.

Oracles: numpy for the pooling lrpc appends to an encoder's graph (its values, and the relevance of
x ⊙ ∂⟨e, seed⟩/∂x worked out by hand, AttnLRP's frozen norm included); torch autograd of
cos(emb(A), emb(B)) on a tiny BERT folder. (The generic path on the real trained MiniLM folder against
`lrpc demo`: tests/test_frontend.py::test_main_job_explains_similarity.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrpc
from lrpc import embedding

B, T, H = 2, 5, 4


def _encoder(path, *, mask: bool = True):
    """A stand-in encoder: its hidden states are its float input (so ∂/∂x is the pooling's own)."""
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", H])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
    graph = helper.make_graph([helper.make_node("Identity", ["hidden"], ["last_hidden_state"])], "encoder", inputs,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                             ["batch", "seq", H])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _feed(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(B, T, H).astype(np.float32)
    m = np.ones((B, T), np.int64)
    m[1, 3:] = 0   # row 1 is padded
    return x, m


def _numpy_pool(x, m, pooling):
    if pooling == "cls":
        return x[:, 0]
    w = m[..., None].astype(np.float64)
    return (x * w).sum(1) / w.sum(1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_appended_pooling_and_its_relevance_against_numpy(tmp_path, pooling):
    x, m = _feed()
    source = _encoder(tmp_path / "encoder.onnx")
    pooled = embedding.pooled(onnx.load(source), pooling)
    assert [o.name for o in pooled.graph.output] == [embedding.OUTPUT]
    p = _numpy_pool(x.astype(np.float64), m, pooling)
    norm = np.linalg.norm(p, axis=-1, keepdims=True)
    e = p / norm
    seed = np.random.RandomState(1).randn(B, H).astype(np.float32)
    # d/dx of ⟨p/‖p‖, seed⟩: the exact chain rule (gxi), and AttnLRP's with the norm a constant
    exact = (seed - (e * seed).sum(-1, keepdims=True) * e) / norm
    frozen = seed / norm
    dp_dx = np.zeros((B, T))
    if pooling == "cls":
        dp_dx[:, 0] = 1
    else:
        dp_dx = m / m.sum(1, keepdims=True)
    for preset, grad in (("gxi", exact), ("attnlrp", frozen)):
        explainer = lrpc.Explainer(lrpc.compile(pooled, preset=preset, seed="vector"))
        out = explainer.explain({"hidden": x, "attention_mask": m}, seed=seed)
        np.testing.assert_allclose(out.outputs[embedding.OUTPUT], e, rtol=1e-5, atol=1e-6)
        want = x * dp_dx[..., None] * grad[:, None, :]
        np.testing.assert_allclose(out.relevance["hidden"], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out.logit, (e * seed).sum(-1), rtol=1e-5, atol=1e-6)


def test_pooling_without_a_mask_and_without_a_pooler(tmp_path):
    x, _ = _feed()
    pooled = embedding.pooled(onnx.load(_encoder(tmp_path / "e.onnx", mask=False)), "mean")
    import onnxruntime as ort
    (got,) = ort.InferenceSession(pooled.SerializeToString()).run(None, {"hidden": x})
    p = x.mean(1)
    np.testing.assert_allclose(got, p / np.linalg.norm(p, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(lrpc.LrpcError, match="pooler_output"):
        embedding.pooled(onnx.load(tmp_path / "e.onnx"), "pooler")
    with pytest.raises(lrpc.LrpcError, match="unknown pooling 'max'"):
        embedding.pooled(onnx.load(tmp_path / "e.onnx"), "max")


def _st_folder(folder, **modes):
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{k}": v for k, v in modes.items()}))
    return folder


def test_default_pooling_reads_sentence_transformers_metadata(tmp_path):
    assert embedding.default_pooling(_st_folder(tmp_path / "cls", cls_token=True, mean_tokens=False)) == "cls"
    assert embedding.default_pooling(_st_folder(tmp_path / "mean", cls_token=False, mean_tokens=True)) == "mean"
    assert embedding.default_pooling(tmp_path) == "mean"          # no metadata
    assert embedding.default_pooling("bert") == "mean"            # a zoo name
    with pytest.raises(lrpc.LrpcError, match="pools by max_tokens") as info:
        embedding.default_pooling(_st_folder(tmp_path / "max", max_tokens=True))
    assert "\n" not in str(info.value)


def test_encoder_default_target_is_refused_and_similar_to_explains(tmp_path):
    """An encoder's hidden states have no predicted class: no target is an error naming the way out;
    Attributor.similarity explains the pooled similarity instead."""
    source = _encoder(tmp_path / "encoder.onnx")
    x, m = _feed()
    attributor = lrpc.Attributor(source, cache=tmp_path / "cache")
    with pytest.raises(lrpc.LrpcError, match="--similar-to") as info:
        attributor.attribute({"hidden": x, "attention_mask": m})
    assert "\n" not in str(info.value)
    assert attributor.attribute({"hidden": x[:1], "attention_mask": m[:1]}, target=2).target == 2
    a, b = {"hidden": x[:1], "attention_mask": m[:1]}, {"hidden": x[1:, :3], "attention_mask": m[1:, :3]}
    first, second = attributor.similarity(a, b)
    e = [p / np.linalg.norm(p) for p in (x[0].mean(0), x[1, :3].mean(0))]
    assert first.logit == pytest.approx(float(e[0] @ e[1]), abs=1e-5) == second.logit
    # AttnLRP: the norm is a constant, mean pooling linear: R = x ⊙ e_B / (‖p_A‖ T)
    want = x[0] * e[1] / (np.linalg.norm(x[0].mean(0)) * T)
    np.testing.assert_allclose(first.relevances["hidden"], want, rtol=1e-4, atol=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from lrpc.cli import main
    source = _encoder(tmp_path / "encoder.onnx")
    x, m = _feed()
    np.savez(tmp_path / "x.npz", hidden=x, attention_mask=m)
    cache = ["--cache", str(tmp_path / "cache")]
    for args, message in [(["--text", "a", "--similar-to", "b", "--target", "3"], "drop --target"),
                          (["--text", "a", "--text", "b", "--similar-to", "c"], "give one --text"),
                          (["--input", str(tmp_path / "x.npz"), "--similar-to", "c"], "drop the other inputs"),
                          (["--text", "a", "--pooling", "cls"], "give --similar-to B"),
                          (["--input", str(tmp_path / "x.npz")], "--similar-to"),
                          (["--text", "a", "--image", "b.png"], "not an image–text dual encoder")]:
        assert main(["explain", str(source), *args, *cache]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---- Hugging Face folders: random heads, and the similarity against torch autograd -------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lrpc import models  # noqa: E402
from lrpc.inputs import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    entry = models.get("bert")
    return entry.hf_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A BertModel folder: an encoder without any head."""
    module, _ = models.get("bert").build()
    folder = tmp_path_factory.mktemp("encoder")
    module.hf_model.bert.save_pretrained(str(folder))
    return folder


def test_random_head_is_refused_unless_allowed(encoder_dir, bert_dir, tmp_path):
    from lrpc.frontend import hf_module
    for task in ("sequence-classification", "causal-lm"):
        with pytest.raises(lrpc.LrpcError, match="--allow-random-head") as info:
            hf_module(encoder_dir, task)
        assert "\n" not in str(info.value) and "head" in str(info.value)
    hf_module(encoder_dir, "sequence-classification", allow_random_head=True)
    hf_module(bert_dir, "sequence-classification")    # its own trained head: no refusal
    out = tmp_path / "e.onnx"
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(encoder_dir), "--task",
                           "sequence-classification", "-o", str(out)], capture_output=True, text=True)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "--allow-random-head" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def _autograd_similarity(folder, pooling, a, b):
    """torch: cos(emb(a), emb(b)) and input ⊙ gradient at each side's token embeddings, summed per token."""
    model = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    tokenizer = Tokenizer.toy()
    embeddings, inputs = [], []
    for text in (a, b):
        ids = torch.tensor([tokenizer.encode(text)[0]])
        captured = {}
        hook = model.embeddings.word_embeddings.register_forward_hook(lambda mod, args, out: captured.setdefault("x", out))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        hook.remove()
        pooled = {"mean": out.last_hidden_state.mean(1), "cls": out.last_hidden_state[:, 0],
                  "pooler": out.pooler_output}[pooling]
        embeddings.append(torch.nn.functional.normalize(pooled, dim=-1))
        inputs.append(captured["x"])
    cosine = (embeddings[0] * embeddings[1]).sum()
    grads = torch.autograd.grad(cosine, inputs)
    return float(cosine.detach()), [(x * g).sum(-1)[0].detach().numpy() for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_gxi_similarity_equals_autograd_on_a_bert_folder(encoder_dir, tmp_path_factory, pooling):
    a, b = "the cat sat on the mat", "a dog ran"
    attributor = lrpc.Attributor(encoder_dir, tokenizer="toy", preset="gxi", task="feature-extraction",
                                 cache=tmp_path_factory.mktemp("cache"))
    results = attributor.similarity(a, b, pooling=pooling)
    cosine, want = _autograd_similarity(encoder_dir, pooling, a, b)
    assert len(results) == 2 and results[0].tokens == a.split()
    for got, expected in zip(results, want):
        assert got.logit == pytest.approx(cosine, abs=1e-5)
        err = np.abs(got.relevance - expected).max() / np.abs(expected).max()
        assert err <= 1e-4, err
    assert results[0].target_label == f"similarity with {b!r}" and results[0].target is None
