"""Issue 4: the torch frontend, Hugging Face folders, vector seeds and the main job."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import lrpc
from lrpc import models
from oracles import relative_error

ZOO = models.names()


def _explain(proto, entry, inputs, **kw):
    ex = lrpc.Explainer(proto)
    rank3 = ex.meta["rank"] == 3
    feed = {k: v.numpy() for k, v in inputs.items()}
    return ex.explain(feed, target=[1, 2], position=[1, -1] if rank3 else None, **kw)


@pytest.mark.parametrize("name", ZOO)
def test_torch_frontend_equals_export_then_compile(name, zoo_export):
    """lrpc.compile(module, example_inputs) ≡ torch.onnx.export by hand + lrpc.compile(file), ≤ 1e-5."""
    entry = models.get(name)
    module, by_hand = zoo_export(name)
    inputs = entry.inputs(*entry.example_shape)
    direct = lrpc.compile(module, inputs, preset="attnlrp")
    compiled = lrpc.compile(by_hand, preset="attnlrp")
    a, b = _explain(direct, entry, inputs), _explain(compiled, entry, inputs)
    for attributed in entry.attributed:
        assert relative_error(a.relevance[attributed], b.relevance[attributed]) <= 1e-5


def test_frontend_takes_positional_inputs_and_any_module():
    """A module outside the zoo, example inputs as a tuple: Input×Gradient equals autograd."""
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 12)
            self.attn = torch.nn.MultiheadAttention(12, 3, batch_first=True)
            self.head = torch.nn.Linear(12, 5)

        def forward(self, tokens):
            h = self.emb(tokens)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(torch.nn.functional.silu(h))

    module = Tagger().eval()
    tokens = torch.randint(0, 30, (2, 6))
    proto = lrpc.compile(module, (tokens,), preset="gxi")
    result = lrpc.Explainer(proto).explain({"tokens": tokens.numpy()}, target=[3, 4], position=[2, -1])
    emb = module.emb(tokens).detach().requires_grad_(True)
    h = emb + module.attn(emb, emb, emb, need_weights=False)[0]
    y = module.head(torch.nn.functional.silu(h))
    y[[0, 1], [2, 5], [3, 4]].sum().backward()
    assert relative_error(result.relevance["tokens"], (emb * emb.grad).sum(-1).detach().numpy()) <= 1e-4


def test_unsupported_construct_names_module_and_op():
    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real

    with pytest.raises(lrpc.LrpcError) as info:
        lrpc.compile(Eig(), {"x": torch.randn(2, 3, 3)})
    message = str(info.value)
    assert "Eig" in message and "\n" not in message


def test_vector_seed_is_linear_in_the_seed(zoo_export):
    """Σ_c seed_c·y_c: a one-hot seed equals lrp_target, and relevance is linear in the seed."""
    entry = models.get("bert")
    _, proto = zoo_export("bert")
    inputs = {k: v.numpy() for k, v in entry.inputs(2, 7).items()}
    by_target = lrpc.Explainer(lrpc.compile(proto))
    by_seed = lrpc.Explainer(lrpc.compile(proto, seed="vector"))
    r0 = by_target.explain(inputs, target=[0, 0]).relevance["input_ids"]
    r2 = by_target.explain(inputs, target=[2, 2]).relevance["input_ids"]
    one_hot = np.eye(3, dtype=np.float32)[[0, 0]]
    assert relative_error(by_seed.explain(inputs, seed=one_hot).relevance["input_ids"], r0) <= 1e-5
    mixed = by_seed.explain(inputs, seed=np.array([[1.0, 0, -1.0]] * 2, np.float32))
    assert relative_error(mixed.relevance["input_ids"], r0 - r2) <= 1e-4
    logits = mixed.outputs["logits"]
    assert np.allclose(mixed.logit, logits[:, 0] - logits[:, 2], atol=1e-6)


def test_hf_folder_export_and_compile(tmp_path):
    entry = models.get("llama")
    module, _ = entry.build()
    folder = entry.hf_dir(tmp_path / "tiny-llama", module)
    exported = tmp_path / "llama.onnx"
    cli = [sys.executable, "-m", "lrpc.cli"]
    proc = subprocess.run(cli + ["export", "hf", str(folder), "-o", str(exported), "--task", "causal-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(exported))
    explainer = tmp_path / "explainer.onnx"
    proc = subprocess.run(cli + ["compile", str(folder), "-o", str(explainer)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    inputs = entry.inputs(2, 7)
    a = _explain(onnx.load(explainer), entry, inputs)
    b = _explain(lrpc.compile(str(exported)), entry, inputs)
    assert relative_error(a.relevance["input_ids"], b.relevance["input_ids"]) <= 1e-5
    with torch.no_grad():
        assert np.allclose(a.outputs["logits"], module(**inputs).numpy(), atol=1e-5)


def test_main_job_explains_similarity(tmp_path, capsys):
    """`lrpc demo` (the zoo's MiniLM sentence encoder, pooled in torch) and `lrpc explain FOLDER --similar-to`
    (the generic path: the trained MiniLM's Hugging Face folder, BertModel exported, mean pooling read from its
    sentence-transformers metadata and appended in ONNX) give the same numbers."""
    from lrpc.cli import main
    from lrpc.demo import explain_similarity, minilm_tokenizer, run_demo
    pair = ("A man is playing a guitar.", "Someone plays an instrument on stage.")
    tokens, relevance, cosine, _ = explain_similarity(*pair, cache=tmp_path)
    assert tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]"
    assert len(relevance[0]) == len(tokens[0]) and len(relevance[1]) == len(tokens[1])
    assert main(["explain", str(models.minilm_dir()), "--text", pair[0], "--similar-to", pair[1], "--json",
                 "--cache", str(tmp_path)]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert len(docs) == 2
    for doc, tok, rel in zip(docs, tokens, relevance):
        assert doc["tokens"] == tok and doc["target_label"].startswith("similarity with")
        assert np.abs(np.array(doc["relevance"]) - rel).max() <= 1e-4 * np.abs(rel).max()
        assert doc["conservation"]["explained_value"] == pytest.approx(cosine, abs=1e-5)
    # the explained value is the cosine similarity of the sentence embeddings torch computes
    module, _ = models.get("minilm-sentence").build()
    with torch.no_grad():
        a, b = (module(torch.tensor([e.ids]), torch.tensor([e.attention_mask]))[0]
                for e in minilm_tokenizer().encode_batch(list(pair)))
    assert cosine == pytest.approx(float(a @ b), abs=1e-5)
    # what the relevance sums to: AttnLRP on BERT loses what biases and position embeddings absorb
    for r in relevance:
        assert 0.3 * cosine < r.sum() < 1.1 * cosine
    html = tmp_path / "report.html"
    assert run_demo(html=str(html), cache=tmp_path) == 0
    text = html.read_text()
    assert "guitar" in text and "<script" not in text and "http" not in text
