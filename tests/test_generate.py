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
    (("--generate", "-1"), "--generate -1 must be at least 1"),
    (("--generate", "two"), "argument --generate: invalid int value: 'two'"),   # argparse's, in one line too
    (("--top-k", "abc"), "argument --top-k: invalid int value: 'abc'"),
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


def _count_runs(attributor) -> dict[str, int]:
    """Counts of the onnxruntime runs of the attributor's K explainer ("many") and single-target one."""
    calls = {"many": 0, "single": 0}
    for key, explainer in (("many", attributor._many()), ("single", attributor.explainer)):
        def counted(names, feed, run=explainer._run, key=key):
            calls[key] += 1
            return run(names, feed)
        explainer._run = counted
    return calls


@pytest.mark.parametrize("name,k,contrast", [("llama", 3, "dog"), ("bert", 2, None)])
def test_top_k_is_one_k_run_equal_to_the_k_loop(name, k, contrast, saved, cache):
    _, path = saved(name)
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    calls = _count_runs(attributor)
    texts = ["a great movie , i love it", "the cat sat on the"]   # two lengths: one padded batch
    got = attributor.attribute(texts, top_k=k, contrast=contrast)
    assert calls == {"many": 1, "single": 1}   # the forward that ranks the classes, then ONE explainer run
    assert len(got) == 2 * k
    for a in got:  # the K-loop: each target explained alone by the single-target explainer
        ref = attributor.attribute(texts[0] if a.tokens == got[0].tokens else texts[1], target=a.target,
                                   contrast=contrast)
        assert relative_error(a.relevance, ref.relevance) <= 1e-5
        assert a.logit == pytest.approx(ref.logit, rel=1e-5) and a.position == ref.position


def test_generation_from_a_compiled_explainer_asks_for_the_model(saved, cache):
    _, path = saved("llama")
    explainer = lrpc.Explainer(lrpc.compile(str(path), seed="vector"))
    with pytest.raises(lrpc.LrpcError, match="needs the original model") as err:
        lrpc.Attributor(explainer, tokenizer="toy").generate(PROMPT, 2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("first", (False, True), ids=("second-token", "first-token"))
def test_generation_stops_at_the_eos_of_the_model_folder(saved, cache, tmp_path, first):
    """The EOS comes from the model's own files: config.json, overridden by generation_config.json (as in
    Hugging Face's generate). Made to be a token greedy decoding produces, so the answer stops early."""
    import shutil
    module, path = saved("llama")
    free = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, max_new_tokens=5, stop_at_eos=False)
    at = 0 if first else 1
    eos = free.generated_ids[at]
    assert eos not in free.generated_ids[:at]
    shutil.copy(path, tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": (eos + 1) % 128}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    gen = lrpc.Attributor(tmp_path / "model.onnx", tokenizer="toy", cache=cache).generate(PROMPT, max_new_tokens=5)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    assert gen.generated_ids == free.generated_ids[:at + 1] == _hf_greedy(module, ids, 5, eos=eos)
    assert gen.matrix.shape == (at + 1, len(ids) + at + 1) and gen.generated_tokens[-1] == free.generated_tokens[at]
    assert relative_error(gen.matrix, free.matrix[:at + 1, :len(ids) + at + 1]) <= 1e-5


def test_generation_of_one_token_after_a_one_token_prompt(saved, cache):
    module, path = saved("gpt2")
    gen = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate("the", max_new_tokens=1)
    ids, _ = Tokenizer.toy().encode("the")
    assert len(ids) == 1 and gen.generated_ids == _hf_greedy(module, ids, 1, eos=2)
    single = lrpc.Explainer(lrpc.compile(str(path)))
    feed = {"input_ids": np.array([ids + gen.generated_ids]), "attention_mask": np.ones((1, 2), np.int64)}
    want = single.explain(feed, target=gen.generated_ids, position=[0]).relevance["input_ids"]
    assert gen.matrix.shape == (1, 2) and gen.matrix[0, 1] == 0.0
    assert relative_error(gen.matrix, want) <= 1e-5
    assert gen.source_tokens == ["the", gen.generated_tokens[0]] and gen.prompt_length == 1


def test_generation_up_to_the_models_last_position(saved, cache):
    """GPT-2's learned positions end at 64: like Hugging Face's generate, the answer may fill them (the last
    generated token is never fed back); one token more is refused in one line naming the largest N."""
    module, path = saved("gpt2")
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    n = 64 - len(ids) + 1
    gen = attributor.generate(PROMPT, max_new_tokens=n, stop_at_eos=False)
    assert gen.generated_ids == _hf_greedy(module, ids, n, eos=None)
    assert gen.matrix.shape == (n, 64 + 1) and np.all(gen.matrix[:, -1] == 0.0)
    with pytest.raises(lrpc.LrpcError, match=rf"give max_new_tokens \(--generate\) ≤ {n} for this prompt") as err:
        attributor.generate(PROMPT, max_new_tokens=n + 1, stop_at_eos=False)
    assert "\n" not in str(err.value)


def test_generation_pictures_match_the_matrix(saved, cache, tmp_path, monkeypatch):
    """HTML and PNG show the matrix as it is: one row per generated token, one column per source token,
    labelled with them; the HTML's cells hold the exact values."""
    import re

    from lrpc import viz
    _, path = saved("llama")
    gen = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, max_new_tokens=4)
    page = gen.to_html()
    assert page.count("<th class='col'>") == len(gen.source_tokens) == gen.matrix.shape[1]
    rows = re.findall(r"<tr><th class='row'>([^<]*)</th>", page)
    assert rows == [f"{i}: {t}" for i, t in enumerate(gen.generated_tokens)] and len(rows) == gen.matrix.shape[0]
    cells = np.array([float(v) for v in re.findall(r"data-relevance='([^']*)'", page)]).reshape(gen.matrix.shape)
    np.testing.assert_allclose(cells, gen.matrix, rtol=1e-7, atol=0)
    drawn = {}
    real = viz.layers_png_bytes

    def spy(labels, tokens, matrix, title=""):
        drawn.update(labels=labels, tokens=tokens, matrix=matrix)
        return real(labels, tokens, matrix, title)
    monkeypatch.setattr(viz, "layers_png_bytes", spy)
    written = gen.save_png(tmp_path / "g.png")
    assert written.read_bytes().startswith(b"\x89PNG")
    assert drawn["labels"] == rows and drawn["tokens"] == gen.source_tokens
    np.testing.assert_array_equal(drawn["matrix"], gen.matrix)


def _tiny_token_model(bidirectional: bool, classes: int):
    """A one-layer token model: mean-mixing over the whole sequence (not causal) or over the prefix, with a
    head of `classes` outputs (fewer than the vocabulary: not next-token logits)."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(128, 8)
            self.head = torch.nn.Linear(8, classes)

        def forward(self, input_ids):
            h = self.embed(input_ids)
            mixed = h.mean(1, keepdim=True) if bidirectional else h.cumsum(1) / torch.arange(
                1, h.shape[1] + 1).reshape(1, -1, 1)
            return self.head(h + mixed)
    return Model().eval()


@pytest.mark.parametrize("bidirectional,classes,message", [
    (True, 128, "changes at earlier positions when a token is appended"),
    (False, 16, "has 16 values per token for a vocabulary of 128"),
])
def test_generation_refuses_what_is_not_a_causal_lm(cache, bidirectional, classes, message):
    """Greedy decoding of an encoder or a token classifier would be noise: one line saying why."""
    import torch
    model = _tiny_token_model(bidirectional, classes)
    attributor = lrpc.Attributor(model, example_inputs={"input_ids": torch.tensor([[5, 6, 7, 8]])}, tokenizer="toy",
                                 cache=cache)
    with pytest.raises(lrpc.LrpcError, match=message) as err:
        attributor.generate(PROMPT, 3)
    assert "\n" not in str(err.value) and "generation needs a causal language model" in str(err.value)


@pytest.mark.parametrize("name,task", [("minilm", "feature-extraction"), ("bert", "sequence-classification")])
def test_cli_generate_on_a_zoo_model_that_is_not_a_language_model(name, task, cache):
    """Said in one line before the model is built or exported (the real MiniLM takes a minute to export)."""
    run = _cli(name, "--text", "a man plays guitar", "--generate", "2", cache=cache)
    assert run.returncode == 2 and f"{name} is a {task} model" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_top_k_lines_of_a_batch_file_are_one_k_run(saved, cache, tmp_path):
    """`lrpc explain --file` with "top_k" lines: the lines of one batch make ONE K-explainer run (after the
    forward that ranks the classes), each target equal to its own single-target explanation."""
    _, path = saved("gpt2")
    attributor = lrpc.Attributor(path, tokenizer="toy", cache=cache)
    calls = _count_runs(attributor)
    texts = ["the cat sat on the", "a great movie , i love"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "top_k": 3}) + "\n" for t in texts))
    got = attributor.attribute_file(tmp_path / "in.jsonl")
    assert calls == {"many": 1, "single": 1} and len(got) == 6 and not got.errors
    for a in got:
        ref = attributor.attribute(texts[a.index], target=a.target)
        assert relative_error(a.relevance, ref.relevance) <= 1e-5 and a.line == a.index + 1


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 0.7},
    {"no_repeat_ngram_size": 2, "min_new_tokens": 3, "eos_token_id": "first"},
    {"suppress_tokens": ["first", "third"], "repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
    {"begin_suppress_tokens": ["first"], "min_length": 8, "eos_token_id": "second"},
], ids=("penalty", "ngram-min-new", "suppress", "begin-min-length"))
def test_generation_follows_the_greedy_options_of_generation_config(saved, cache, tmp_path, options):
    """Hugging Face's greedy generate applies generation_config.json's repetition penalty, n-gram ban,
    minimum length and suppressed tokens; so does Attributor.generate (each option chosen to change the
    plain greedy answer's tokens: "first" is the first token greedy decoding gives without them)."""
    import shutil
    module, path = saved("llama")
    free = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, 8, stop_at_eos=False).generated_ids
    named = {"first": free[0], "second": free[1], "third": free[2]}
    config = {k: ([named.get(x, x) for x in v] if isinstance(v, list) else named.get(v, v)) for k, v in options.items()}
    shutil.copy(path, tmp_path / "model.onnx")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **config}))
    gen = lrpc.Attributor(tmp_path / "model.onnx", tokenizer="toy", cache=cache).generate(PROMPT, 8)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    import torch
    prompt = torch.tensor([ids])
    with torch.no_grad():
        want = module.hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                        do_sample=False, pad_token_id=0, **{"eos_token_id": 2, **config})
    assert gen.generated_ids == want[0, len(ids):].tolist() != free[:len(gen.generated_ids)]
