"""Many targets of one input in one K-explainer run (issue 14): generation attribution
(`Attributor.generate` / `lrpc explain --generate N` greedily generate with onnxruntime and explain every
generated token at once) and the attributor's top-k. Oracles: Hugging Face `generate(do_sample=False)` on
the same torch model for the tokens; the single-target explainer (checked against torch autograd in
test_gxi_zoo.py), run once per target, for the relevance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import lrpc
from lrpc.inputs import Tokenizer
from oracles import relative_error

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("generate-cache")


@pytest.fixture(scope="module")
def saved(zoo_export, tmp_path_factory):
    """name → (torch module, ONNX file) of a zoo causal LM."""
    folder = tmp_path_factory.mktemp("generate-models")

    def get(name):
        module, proto = zoo_export(name)
        path = folder / f"{name}.onnx"
        if not path.exists():
            onnx.save(proto, path)
        return module, path
    return get


def _hf_greedy(module, ids: list[int], n: int, eos: int) -> list[int]:
    import torch
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = module.hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                       do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ("llama", "gpt2"))
def test_generation_matrix_tokens_and_causality(name, saved, cache):
    module, path = saved(name)
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    n = 6
    gen = attributor.generate(PROMPT, max_new_tokens=n)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    start = len(ids)
    # the tokens are Hugging Face's greedy output for the same weights (the zoo's EOS is id 2, "[EOS]")
    assert gen.generated_ids == _hf_greedy(module, ids, n, eos=2)
    k = len(gen.generated_ids)
    assert gen.matrix.shape == (k, start + k) and len(gen.source_tokens) == start + k
    assert gen.generated_tokens == gen.source_tokens[start:]
    # each row equals a single-target explanation of that token at the position that predicts it
    single = lrpc.Explainer(lrpc.compile(str(path)))
    feed = {"input_ids": np.array([ids + gen.generated_ids]), "attention_mask": np.ones((1, start + k), np.int64)}
    rows = [single.explain(feed, target=[t], position=[start - 1 + i]) for i, t in enumerate(gen.generated_ids)]
    expected = np.stack([r.relevance["input_ids"][0] for r in rows])
    assert relative_error(gen.matrix, expected) <= 1e-5
    np.testing.assert_allclose(gen.logits, [r.logit[0] for r in rows], rtol=1e-5)
    # causality: nothing after the predicting position gets relevance, exactly
    for i in range(k):
        assert np.all(gen.matrix[i, start + i:] == 0.0), i
        assert np.any(gen.matrix[i, :start + i] != 0.0), i


def test_generation_stops_at_the_end_of_sequence_token(saved, cache, monkeypatch):
    module, path = saved("llama")
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    free = attributor.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    eos = free.generated_ids[1]   # pretend the second generated token is the model's EOS
    monkeypatch.setattr(attributor, "_eos_ids", lambda: {eos})
    stopped = attributor.generate(PROMPT, max_new_tokens=4)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    assert stopped.generated_ids == free.generated_ids[:2] == _hf_greedy(module, ids, 4, eos=eos)
    np.testing.assert_array_equal(stopped.matrix, free.matrix[:2, :len(ids) + 2])


def test_generation_outputs(saved, cache, tmp_path):
    _, path = saved("llama")
    gen = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, max_new_tokens=3)
    doc = json.loads(gen.to_json())
    np.testing.assert_array_equal(np.asarray(doc["matrix"], np.float32), gen.matrix)
    assert doc["generated_ids"] == gen.generated_ids and doc["source_tokens"] == gen.source_tokens
    gen.source_tokens[0] = "<script>'x'"   # tokens are data: escaped in the page
    page = gen.to_html(tmp_path / "g.html")
    assert "<script>" not in page and "&lt;script&gt;" in page and (tmp_path / "g.html").read_text() == page
    assert page.count("<td ") == gen.matrix.size and "http" not in page.replace("http-equiv", "")
    with pytest.raises(lrpc.LrpcError, match="exists"):
        gen.to_html(tmp_path / "g.html")   # safeio: never over an existing file without force


def _cli(*args, cache):
    env = {**os.environ, "LRPC_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lrpc.cli", "explain", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_cli_generate(saved, cache, tmp_path):
    _, path = saved("llama")
    run = _cli(path, "--tokenizer", "toy", "--text", PROMPT, "--generate", "3", "--json",
               "--html", tmp_path / "g.html", cache=cache)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    expected = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, 3)
    assert doc["generated_ids"] == expected.generated_ids
    np.testing.assert_allclose(doc["matrix"], expected.matrix, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "g.html").read_text().count("<td ") == expected.matrix.size


@pytest.mark.parametrize("args,message", [
    (("--generate", "0"), "--generate 0 must be at least 1"),
    (("--generate", "2", "--top-k", "2"), "drop --top-k"),
    (("--generate", "2", "--text", "a dog"), "exactly one --text"),
])
def test_cli_generate_refuses_bad_options_in_one_line(saved, cache, args, message):
    _, path = saved("llama")
    run = _cli(path, "--tokenizer", "toy", "--text", PROMPT, *args, cache=cache)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_generation_needs_a_causal_lm(zoo_export, cache):
    _, proto = zoo_export("bert")
    with pytest.raises(lrpc.LrpcError, match="causal language model"):
        lrpc.Attributor(proto, tokenizer="toy", cache=cache).generate("a great movie", 2)


@pytest.mark.parametrize("name,k,contrast", [("llama", 3, "dog"), ("bert", 2, None)])
def test_top_k_is_one_k_run_equal_to_the_k_loop(name, k, contrast, saved, cache):
    _, path = saved(name)
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    many, single = attributor._many(), attributor.explainer
    calls = {"many": 0, "single": 0}
    for key, explainer in (("many", many), ("single", single)):
        def counted(names, feed, run=explainer._run, key=key):
            calls[key] += 1
            return run(names, feed)
        explainer._run = counted
    texts = ["a great movie , i love it", "the cat sat on the"]   # two lengths: one padded batch
    got = attributor.attribute(texts, top_k=k, contrast=contrast)
    assert calls == {"many": 1, "single": 1}   # the forward that ranks the classes, then ONE explainer run
    assert len(got) == 2 * k
    for a in got:  # the K-loop: each target explained alone by the single-target explainer
        ref = attributor.attribute(texts[0] if a.tokens == got[0].tokens else texts[1], target=a.target,
                                   contrast=contrast)
        assert relative_error(a.relevance, ref.relevance) <= 1e-5
        assert a.logit == pytest.approx(ref.logit, rel=1e-5) and a.position == ref.position
