"""Corpus-scale explanation (`lrpc explain … --file corpus.jsonl --out results.parquet`): the rows equal
single `Attributor.attribute` calls, bucketing changes nothing, bad lines become error rows, and a run
killed mid-way and resumed writes the same file as one that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import lrpc
from lrpc.corpus import Corpus, ModelSpec, Output, read_output
from lrpc.corpus_run import explain_corpus
from lrpc.attributor import Attributor
from lrpc.inputs import TOY_WORDS

WORDS = [w for w in TOY_WORDS if w.isalpha()]


def mixed_corpus(path, n, seed=0, bad=True):
    """n lines of 1–40 toy words (some with an "id", some with their own target or top-k), and bad lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        doc = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))}
        if i % 7 == 0:
            doc["id"] = f"doc-{i}"
        if i % 11 == 0:
            doc["top_k"] = 2
        elif i % 13 == 0:
            doc["target"] = 1
        lines.append(json.dumps(doc))
    if bad:
        lines[5] = "{not json"
        lines[9] = json.dumps({"txt": "a typo in the key"})
        lines[12] = json.dumps({"text": "   "})                          # empty text
        lines[20] = json.dumps({"text": " ".join(["the"] * 90)})        # longer than the model's 64 positions
        lines[30] = ""                                                    # blank: no row
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lrpc-cache")


@pytest.fixture(scope="module")
def bert(zoo_export, tmp_path_factory, cache):
    """The zoo's tiny BERT as an ONNX file, its explainer compiled into `cache`; a ModelSpec for it."""
    path = tmp_path_factory.mktemp("models") / "bert.onnx"
    onnx.save(zoo_export("bert")[1], path)
    spec = ModelSpec(str(path), tokenizer="toy", cache=str(cache))
    spec.build()
    return spec


def run(spec, corpus, out, **options):
    settings = {"model": spec.model, "corpus": str(corpus)}
    return explain_corpus(spec, Corpus(corpus), Output(out, settings), progress=False, **options)


def rows_by_line(table):
    return {(r["line"], r["target"]): r for r in table.to_pylist()}


def assert_same_rows(a, b, tol=1e-6):
    ra, rb = rows_by_line(a), rows_by_line(b)
    assert ra.keys() == rb.keys()
    for key, x in ra.items():
        y = rb[key]
        assert {k: x[k] for k in ("id", "tokens", "shape", "label", "error")} == \
            {k: y[k] for k in ("id", "tokens", "shape", "label", "error")}
        if x["error"] is None:
            assert np.allclose(x["relevance"], y["relevance"], rtol=0, atol=tol)
            assert abs(x["logit"] - y["logit"]) <= tol and abs(x["conservation"] - y["conservation"]) <= tol


def test_rows_equal_single_explanations_and_bad_lines_are_error_rows(bert, tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus.jsonl", 40)
    rows, errors = run(bert, corpus, tmp_path / "out.parquet", batch_size=8)
    table = read_output(tmp_path / "out.parquet")
    assert rows == table.num_rows and errors == 4
    assert not (tmp_path / "out.parquet.partial").exists()
    lines = [r["line"] for r in table.to_pylist()]
    assert lines == sorted(lines)                                     # input order, whatever the bucketing
    single = Attributor(bert.model, tokenizer="toy", cache=bert.cache)   # each input alone, unpadded
    docs = corpus.read_text().splitlines()
    by_line = {}
    for r in table.to_pylist():
        by_line.setdefault(r["line"], []).append(r)
    assert 31 not in by_line                                          # the blank line
    for number, doc in enumerate(docs, 1):
        if number == 31:
            continue
        got = by_line.pop(number)
        if number in (6, 10, 13, 21):
            assert len(got) == 1 and got[0]["error"].startswith(f"line {number}:") and got[0]["relevance"] is None
            continue
        doc = json.loads(doc)
        expected = single.attribute(doc["text"], target=doc.get("target"), top_k=doc.get("top_k"))
        expected = list(expected) if doc.get("top_k") else [expected]
        assert [r["target"] for r in got] == [e.target for e in expected]
        for r, e in zip(got, expected):
            assert r["id"] == doc.get("id", str(number)) and r["tokens"] == e.tokens and r["error"] is None
            assert r["token_ids"] == e.token_ids and [doc["text"][s:t] for s, t in r["offsets"]] == e.tokens
            assert np.allclose(r["relevance"], e.relevance, rtol=0, atol=1e-6) and r["shape"] == [len(e.tokens)]
            assert abs(r["logit"] - e.logit) <= 1e-6 and abs(r["conservation"] - e.conservation) <= 1e-6
    assert not by_line
    messages = {r["line"]: r["error"] for r in table.to_pylist() if r["error"]}
    assert "not JSON" in messages[6] and '"text"' in messages[10] and "empty text" in messages[13]
    assert "onnxruntime" in messages[21]


def test_bucketing_and_formats_do_not_change_the_rows(bert, tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus.jsonl", 500)
    run(bert, corpus, tmp_path / "bucketed.parquet", batch_size=16)
    run(bert, corpus, tmp_path / "plain.jsonl", batch_size=16, bucket=False)
    bucketed, plain = read_output(tmp_path / "bucketed.parquet"), read_output(tmp_path / "plain.jsonl")
    assert bucketed.num_rows > 500
    assert_same_rows(bucketed, plain)


def test_images_and_bad_images(zoo_export, tmp_path, cache):
    from PIL import Image
    path = tmp_path / "vit.onnx"
    onnx.save(zoo_export("hf-vit")[1], path)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + 5 * i, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    corpus = tmp_path / "images.jsonl"
    corpus.write_text("\n".join(json.dumps({"image": name}) for name in
                                ["0.png", "broken.png", "1.png", "missing.png", "2.png"]) + "\n")
    spec = ModelSpec(str(path), cache=str(cache))
    run(spec, corpus, tmp_path / "out.parquet", batch_size=2)
    rows = read_output(tmp_path / "out.parquet").to_pylist()
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert "cannot read the image" in rows[1]["error"] and "not found" in rows[3]["error"]
    single = Attributor(str(path), cache=str(cache))
    for r, name in zip([rows[0], rows[2], rows[4]], ["0.png", "1.png", "2.png"]):
        e = single.attribute(image=str(tmp_path / name))
        assert r["shape"] == list(e.relevance.shape) and r["tokens"] is None
        assert np.allclose(np.reshape(r["relevance"], r["shape"]), e.relevance, rtol=0, atol=1e-6)


def test_an_interrupted_run_resumed_writes_the_same_file(bert, tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus.jsonl", 600)
    whole, resumed = tmp_path / "whole.parquet", tmp_path / "resumed.parquet"
    args = [sys.executable, "-m", "lrpc.cli", "explain", bert.model, "--tokenizer", "toy", "--cache", bert.cache,
            "--file", str(corpus), "--batch-size", "4", "--window", "8"]
    proc = subprocess.Popen([*args, "--out", str(resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / "resumed.parquet.partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("part-*"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not resumed.exists() and len(list(partial.glob("part-*"))) >= 3   # killed half-way
    refused = subprocess.run([*args, "--out", str(resumed)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = subprocess.run([*args, "--out", str(resumed), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr          # the bad lines (6–21) were in the parts written before
    assert subprocess.run([*args, "--out", str(whole)], capture_output=True).returncode == 1   # error rows
    assert whole.read_bytes() == resumed.read_bytes() and not partial.exists()
    again = subprocess.run([*args, "--out", str(whole)], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr                  # never overwritten silently


def test_output_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(lrpc.LrpcError, match=r"\.parquet or \.jsonl"):
        Output(tmp_path / "r.csv", {})
    with pytest.raises(lrpc.LrpcError, match="does not exist"):
        Output(tmp_path / "nowhere" / "r.parquet", {})
    Output(tmp_path / "r.parquet", {"model": "a"})
    with pytest.raises(lrpc.LrpcError, match="other settings"):
        Output(tmp_path / "r.parquet", {"model": "b"}, resume=True)
    out = Output(tmp_path / "r.parquet", {"model": "b"}, force=True)   # starts over
    assert out.done_through() == 0 and out.publish() == 0 and (tmp_path / "r.parquet").is_file()


def test_cli_corpus_options_need_file_and_out(run_lrpc):
    rc, err = run_lrpc("explain", "bert", "--text", "a cat", "--engine", "ray")
    assert rc == 2 and "--file" in err and "--out" in err


@pytest.fixture()
def run_lrpc(capsys):
    from lrpc.cli import main

    def run(*args):
        rc = main([str(a) for a in args])
        return rc, capsys.readouterr().err
    return run


def test_corpus_lines_and_windows_agree(tmp_path):
    corpus = mixed_corpus(tmp_path / "c.jsonl", 50)
    whole = [(line.number, line.text, line.error) for line in Corpus(corpus).lines()]
    pieces = [(line.number, line.text, line.error) for offset, after, count in Corpus(corpus).windows(7, after=3)
              for line in Corpus(corpus).lines(after, offset, count)]
    assert pieces == [x for x in whole if x[0] > 3]
    assert os.path.getsize(corpus) and Corpus(corpus).count() == 50


def test_cli_threads_and_session_options_reach_onnxruntime(bert, run_lrpc, tmp_path):
    config = {"session.intra_op.allow_spinning": "0"}
    options = ModelSpec(bert.model, "toy", cache=bert.cache, threads=1, session_config=config).build() \
        .explainer.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    corpus = mixed_corpus(tmp_path / "c.jsonl", 20, bad=False)
    common = ["explain", bert.model, "--tokenizer", "toy", "--cache", bert.cache, "--file", corpus]
    rc, err = run_lrpc(*common, "--out", tmp_path / "r.jsonl", "--threads", "1", "--ort-config",
                       "session.intra_op.allow_spinning=0")
    assert rc == 0 and read_output(tmp_path / "r.jsonl")["line"].to_pylist()[-1] == 20
    rc, err = run_lrpc(*common, "--out", tmp_path / "s.jsonl", "--ort-config", "spinning")
    assert rc == 2 and "KEY=VALUE" in err and not (tmp_path / "s.jsonl.partial").exists()
