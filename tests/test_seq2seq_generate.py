"""Encoder–decoder generation attribution and text input (issue 16): `Attributor.generate` /
`lrpc explain --generate N` on T5 and BART decode greedily in onnxruntime from the decoder start token and
explain every generated token in one K-explainer run over the source and the answer prefix; `--text` works
on the zoo names (the toy tokenizer, the zoo's token ids). Oracles: Hugging Face `generate(do_sample=False)`
on the same torch model for the tokens; the single-target explainer (= torch autograd under gxi,
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

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("seq2seq-cache")


@pytest.fixture(scope="module")
def saved(zoo_export, tmp_path_factory):
    """name → (torch module, ONNX file with the model's config.json beside it, as an exported folder has)."""
    def get(name):
        module, proto = zoo_export(name)
        folder = tmp_path_factory.getbasetemp() / f"seq2seq-{name}"
        path = folder / "model.onnx"
        if not path.exists():
            folder.mkdir(exist_ok=True)
            module.hf_model.config.to_json_file(folder / "config.json")
            onnx.save(proto, path)
        return module, path
    return get


def _hf_greedy(module, source: list[int], n: int) -> list[int]:
    """Hugging Face's greedy answer (the decoder start token dropped)."""
    import torch
    ids = torch.tensor([source])
    with torch.no_grad():
        out = module.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                       num_beams=1)
    return out[0, 1:].tolist()


@pytest.mark.parametrize("name", ("t5", "bart"))
def test_generation_matrix_tokens_and_causality(name, saved, cache):
    module, path = saved(name)
    config = module.hf_model.config
    n = 5
    gen = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, max_new_tokens=n)
    source, _ = Tokenizer.toy().encode(PROMPT)
    assert gen.generated_ids == _hf_greedy(module, source, n)
    k, s = len(gen.generated_ids), len(source)
    if name == "bart":   # its config forces EOS as the last token, as Hugging Face's generate does
        assert config.forced_eos_token_id == 2 and (k < n or gen.generated_ids[-1] == 2)
    # columns: the source, the decoder start token, the answer
    decoder = [config.decoder_start_token_id] + gen.generated_ids
    assert gen.matrix.shape == (k, s + 1 + k) and len(gen.source_tokens) == s + 1 + k
    assert gen.prompt_length == s + 1 and gen.generated_tokens == gen.source_tokens[s + 1:]
    # each row equals a single-target explanation of that token at the decoder position that predicts it
    single = lrpc.Explainer(lrpc.compile(str(path)))
    feed = {"input_ids": np.array([source]), "attention_mask": np.ones((1, s), np.int64),
            "decoder_input_ids": np.array([decoder]), "decoder_attention_mask": np.ones((1, k + 1), np.int64)}
    rows = [single.explain(feed, target=[t], position=[i]) for i, t in enumerate(gen.generated_ids)]
    expected = np.stack([np.concatenate([r.relevance["input_ids"][0], r.relevance["decoder_input_ids"][0]])
                         for r in rows])
    assert relative_error(gen.matrix, expected) <= 1e-5
    np.testing.assert_allclose(gen.logits, [r.logit[0] for r in rows], rtol=1e-5)
    for i in range(k):
        # the answer prefix: generated token j sits at decoder position j + 1, so tokens at/after i are unseen
        assert np.all(gen.matrix[i, s + 1 + i:] == 0.0), i
        assert np.any(gen.matrix[i, :s] != 0.0) and np.any(gen.matrix[i, s:s + 1 + i] != 0.0), i


def test_generation_of_an_onnx_file_without_its_config_says_what_is_missing(zoo_export, cache, tmp_path):
    _, proto = zoo_export("t5")
    onnx.save(proto, tmp_path / "t5.onnx")
    with pytest.raises(lrpc.LrpcError, match="decoder start token is unknown") as err:
        lrpc.Attributor(tmp_path / "t5.onnx", tokenizer="toy", cache=cache).generate(PROMPT, 2)
    assert "\n" not in str(err.value)


def _cli(*args, cache):
    env = {**os.environ, "LRPC_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lrpc.cli", "explain", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_cli_text_on_the_zoo_t5_explains_the_decoders_last_position(saved, zoo_export, cache, capsys, monkeypatch):
    """`lrpc explain t5 --text …` (a zoo name: no folder, no tokenizer file) tokenises with the toy tokenizer,
    starts the decoder with T5's start token (the zoo entry's config) and explains the predicted token there."""
    from lrpc import cache as cache_module
    from lrpc.cli import main
    module, path = saved("t5")
    # the zoo name compiles this session's export of the same weights instead of exporting again
    monkeypatch.setattr(cache_module, "onnx_source", lambda model, task, pooling=None: zoo_export(str(model))[1])
    monkeypatch.setenv("LRPC_CACHE", str(cache))
    assert main(["explain", "t5", "--text", PROMPT, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    source, tokens = Tokenizer.toy().encode(PROMPT)
    assert doc["tokens"] == tokens and doc["position"] == 0
    start = module.hf_model.config.decoder_start_token_id
    feed = {"input_ids": np.array([source]), "attention_mask": np.ones((1, len(source)), np.int64),
            "decoder_input_ids": np.array([[start]]), "decoder_attention_mask": np.ones((1, 1), np.int64)}
    single = lrpc.Explainer(lrpc.compile(str(path)))
    target = int(np.argmax(single.forward(feed)["logits"][0, -1]))
    want = single.explain(feed, target=[target], position=[0])
    assert doc["target"] == target
    for name in ("input_ids", "decoder_input_ids"):
        assert relative_error(np.array(doc["relevances"][name]), want.relevance[name][0]) <= 1e-5


def test_cli_generate_on_a_seq2seq_folder(saved, cache):
    _, path = saved("bart")
    run = _cli(path, "--tokenizer", "toy", "--text", PROMPT, "--generate", "3", "--json", cache=cache)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    expected = lrpc.Attributor(path, tokenizer="toy", cache=cache).generate(PROMPT, 3)
    assert doc["generated_ids"] == expected.generated_ids and doc["source_tokens"] == expected.source_tokens
    np.testing.assert_allclose(doc["matrix"], expected.matrix, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ("t5", "bart"))
def test_the_zoo_folder_ships_an_offline_tokenizer(name, tmp_path):
    """The zoo's Hugging Face folder of T5 / BART holds the toy tokenizer as tokenizer.json: transformers' own
    AutoTokenizer and lrpc read the same ids offline, its special tokens are the config's, and the attributor
    finds the decoder start token there."""
    from transformers import AutoTokenizer

    from lrpc import models
    entry = models.get(name)
    module, _ = entry.build()
    folder = entry.hf_dir(tmp_path / name, module)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids, _ = Tokenizer.toy().encode(PROMPT)
    assert hf_tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == ids == Tokenizer.load(folder).encode(PROMPT)[0]
    config = module.hf_model.config
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id) == (config.pad_token_id, config.eos_token_id)
    assert all(getattr(config, key) == value for key, value in entry.config.items())   # the zoo's copy agrees
    read = lrpc.Attributor._config(folder / "model.safetensors")
    assert read["decoder_start_token_id"] == config.decoder_start_token_id == entry.config["decoder_start_token_id"]
