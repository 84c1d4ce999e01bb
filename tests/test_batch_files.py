"""Batch files (`lrpc explain --file`, `Attributor.attribute_file`) and batches people give: a bad line is an
error row with its line number and the rest is explained; rows say which line and which characters each
relevance belongs to; inputs of different lengths on a model without an attention mask run grouped by
length. Relevance is checked against a model whose exact relevance is known in closed form (numpy)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lrpc
from lrpc.attributor import Attributor
from lrpc.inputs import Tokenizer
from tests.onnx_builders import mean_pool_model

VOCAB = 128   # the toy tokenizer's 128 words


def expected(model: onnx.ModelProto, text: str, target: int | None = None, rank: int = 0) -> tuple[int, np.ndarray]:
    """(target, relevance per token) by hand: the class of this rank by logit unless given, E[id]·W[:, c] / T."""
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    ids = [VOCAB_IDS[w] for w in text.lower().split()]
    logits = init["E"][ids].mean(axis=0) @ init["W"]
    c = int(np.argsort(-logits)[rank]) if target is None else target
    return c, init["E"][ids] @ init["W"][:, c] / len(ids)


VOCAB_IDS = {w: i for i, w in enumerate(
    ["[PAD]", "[BOS]", "[EOS]", "[UNK]", ".", ",", "!", "?"]
    + [w for w in lrpc.inputs.TOY_WORDS if w not in ".,!?"])}   # the toy tokenizer's documented layout


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mean_pool.onnx"
    onnx.save(mean_pool_model(), path)
    return path


@pytest.fixture(scope="module")
def attributor(model_file, tmp_path_factory):
    return Attributor(str(model_file), tokenizer="toy", cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def run_cli(capsys, tmp_path_factory):
    from lrpc.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


GOOD = ["the cat sat on the mat", "a dog", "good movie great film"]


def batch_file(path):
    lines = [json.dumps({"text": GOOD[0]}),                      # 1
             json.dumps({"text": ""}),                           # 2: empty text
             "{not json",                                        # 3
             json.dumps({"txt": "a typo in the key"}),           # 4: wrong field
             json.dumps({"text": GOOD[1], "target": 99}),        # 5: target out of range
             "",                                                 # 6: blank, no row
             json.dumps({"text": GOOD[2], "top_k": 2}),          # 7: two rows
             json.dumps({"text": GOOD[1], "target": 3}),         # 8
             json.dumps({"text": GOOD[0], "top_k": 0})]          # 9: a count below 1
    path.write_text("\n".join(lines) + "\n")
    return path


ERRORS = {2: "empty text", 3: "not JSON", 4: '"text"', 5: "out of range", 9: "at least 1"}


def test_cli_bad_lines_are_error_rows_the_rest_is_explained_exit_1(model_file, run_cli, tmp_path):
    cache = tmp_path / "cache"
    rc, out, err = run_cli("explain", model_file, "--tokenizer", "toy", "--cache", cache, "--json",
                           "--file", batch_file(tmp_path / "in.jsonl"))
    assert rc == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 7, 7, 8, 9]         # line order; top-k: two rows of line 7
    for r in rows:
        if r["line"] in ERRORS:
            assert r["error"].startswith(f"line {r['line']}: ") and ERRORS[r["line"]] in r["error"]
            assert len(r["error"].splitlines()) == 1
            assert f"lrpc: {r['error']}" in err
    explained = [r for r in rows if "error" not in r]
    wanted = [(GOOD[0], None, 0), (GOOD[2], None, 0), (GOOD[2], None, 1), (GOOD[1], 3, 0)]   # line 7: top 2
    for r, (text, target, rank) in zip(explained, wanted, strict=True):
        c, relevance = expected(mean_pool_model(), text, target, rank)
        assert r["target"] == c
        np.testing.assert_allclose(r["relevance"], relevance, rtol=1e-5, atol=1e-6)
    assert "5 line(s)" in err.splitlines()[-1] and "exit code 1" in err


def test_cli_file_without_bad_lines_exits_0_and_terminal_lists_errors(model_file, run_cli, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in GOOD) + "\n")
    rc, out, err = run_cli("explain", model_file, "--tokenizer", "toy", "--cache", tmp_path / "c", "--file", good)
    assert rc == 0 and out.count("Σ relevance") == 3, err
    rc, out, err = run_cli("explain", model_file, "--tokenizer", "toy", "--cache", tmp_path / "c",
                           "--file", batch_file(tmp_path / "in.jsonl"))
    assert rc == 1 and out.count("Σ relevance") == 4
    listed = [line for line in err.splitlines() if line.startswith("lrpc: line ")]
    assert [int(line.split()[2].rstrip(":")) for line in listed] == list(ERRORS)   # each once, in line order


def test_attribute_file_errors_and_rows_read_back(attributor, tmp_path):
    results = attributor.attribute_file(batch_file(tmp_path / "in.jsonl"))
    assert [e.line for e in results.errors] == list(ERRORS)
    assert [a.line for a in results] == [1, 7, 7, 8] and [a.index for a in results] == [0, 5, 5, 6]   # 6 is blank
    path = tmp_path / "r.json"
    path.write_text(results.to_json())
    back = lrpc.load_results(path)
    assert [(e.line, e.message) for e in back.errors] == [(e.line, e.message) for e in results.errors]
    assert [(a.line, a.index, a.token_ids, a.offsets) for a in back] == \
        [(a.line, a.index, a.token_ids, a.offsets) for a in results]


def test_rows_carry_token_ids_and_character_offsets(attributor):
    text = "The cat,  sat ON the mat!"
    a = attributor.attribute(text)
    doc = json.loads(a.to_json())
    words = ["the", "cat", ",", "sat", "on", "the", "mat", "!"]            # the toy tokenizer lower-cases
    assert doc["tokens"] == words and doc["token_ids"] == [VOCAB_IDS[w] for w in words]
    assert [text[s:e].lower() for s, e in doc["offsets"]] == words          # offsets slice the original text
    assert doc["index"] == 0 and doc["line"] is None


def test_top_k_rows_of_a_batch_say_which_input(attributor):
    results = attributor.attribute(GOOD, top_k=2)
    assert [a.index for a in results] == [0, 0, 1, 1, 2, 2]
    assert [a.tokens for a in results[::2]] == [t.split() for t in GOOD]


def test_different_lengths_without_a_mask_run_grouped_by_length(attributor, monkeypatch):
    texts = ["the cat sat", "a dog", "good movie great film", "the dog", "a big red cat", "sun"]
    assert attributor.mask_name is None
    runs = []
    explain = attributor.explainer.explain
    monkeypatch.setattr(attributor.explainer, "explain",
                        lambda inputs, **kw: runs.append(inputs["input_ids"].shape) or explain(inputs, **kw))
    results = attributor.attribute(texts, batch_size=16)
    assert sorted(runs) == [(1, 1), (1, 3), (2, 2), (2, 4)]   # one run per length (3, 2, 4, 1), no padding
    assert [a.index for a in results] == list(range(len(texts)))             # back in input order
    for a, text in zip(results, texts):
        c, relevance = expected(mean_pool_model(), text)
        assert a.target == c and a.tokens == text.split()
        np.testing.assert_allclose(a.relevance, relevance, rtol=1e-5, atol=1e-6)
    runs.clear()
    attributor.attribute(["a dog", "the dog", "the cat"], batch_size=2)   # batch size still applies per length
    assert runs == [(2, 2), (1, 2)]


def test_a_tokenizer_given_as_an_object_is_not_changed(model_file, tmp_path):
    backend = Tokenizer.toy().backend
    backend.enable_padding(length=12)
    a = Attributor(str(model_file), tokenizer=backend, cache=tmp_path)
    assert a.attribute("a dog").tokens == ["a", "dog"]
    assert backend.padding is not None and backend.padding["length"] == 12   # the caller's object is untouched


def test_a_transformers_tokenizer_is_wrapped_and_other_objects_are_refused(model_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.toy().backend, pad_token="[PAD]")
    a = Attributor(str(model_file), tokenizer=fast, cache=tmp_path)
    r = a.attribute("the cat sat")
    assert r.tokens == ["the", "cat", "sat"] and r.token_ids == fast("the cat sat")["input_ids"]
    with pytest.raises(lrpc.LrpcError, match="tokenizer: a object is not one lrpc can use") as err:
        Attributor(str(model_file), tokenizer=object(), cache=tmp_path)
    assert len(str(err.value).splitlines()) == 1
