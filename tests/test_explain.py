"""`lrpc explain` and the Python API: every target kind, padded batches, latent relevance, pictures —
each checked against values (single runs, the explainer's own inputs), not only that it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import lrpc
from lrpc.attributor import Attributor
from lrpc.cache import compiled_explainer
from lrpc.inputs import Tokenizer, load_image
from lrpc.latent import residual_stream

TEXTS = ["the cat sat on the mat", "a dog", "good movie , great fun !"]


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    return np.abs(a - b).max() <= rtol * scale


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lrpc-cache")


class _Lazy(dict):
    """name → value, made on first use (so an xdist worker exports only the zoo models its tests need)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name):
        self[name] = value = self.make(name)
        return value


@pytest.fixture(scope="module")
def protos(zoo_export):
    return _Lazy(lambda name: zoo_export(name)[1])


@pytest.fixture(scope="module")
def attributors(protos, cache):
    return _Lazy(lambda name: Attributor(protos[name], tokenizer="toy", cache=cache))


# ---- targets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "llama"])
def test_default_target_is_the_prediction_and_one_hot_seed_equals_lrp_target(name, protos, attributors):
    a = attributors[name]
    result = a.attribute(TEXTS[0])
    feed, lengths = a.pad(a._items(TEXTS[0]))
    y = a.explainer.forward(feed)[a.explainer.explained][0]
    y = y[-1] if y.ndim == 2 else y
    assert result.target == int(np.argmax(y)) and np.isclose(result.logit, y.max(), rtol=1e-6)
    # the target-seeded explainer (lrp_target, lrp_position) gives the same relevance as the one-hot seed
    target_mode = lrpc.Explainer(lrpc.compile(protos[name], seed="target"))
    position = [lengths[0] - 1] if a.rank == 3 else None
    reference = target_mode.explain(feed, target=[result.target], position=position)
    assert close(result.relevance, reference.relevance["input_ids"][0])
    assert np.isclose(result.logit, reference.logit[0], rtol=1e-6)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_contrast_is_the_difference_of_two_single_targets(name, attributors):
    a = attributors[name]
    A, B = (2, 0) if name == "bert" else ("mat", "dog")
    both = a.attribute(TEXTS[0], target=A, contrast=B)
    ra, rb = a.attribute(TEXTS[0], target=A), a.attribute(TEXTS[0], target=B)
    assert close(both.relevance, ra.relevance - rb.relevance)
    assert np.isclose(both.logit, ra.logit - rb.logit, rtol=1e-5, atol=1e-7)
    assert both.contrast == rb.target and "−" in both.target_label


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_top_k_equals_k_single_runs(name, attributors):
    a = attributors[name]
    k = 3
    top = a.attribute(TEXTS[2], top_k=k)
    assert len(top) == k
    logits = [t.logit for t in top]
    assert logits == sorted(logits, reverse=True)
    for t in top:
        single = a.attribute(TEXTS[2], target=t.target)
        assert close(t.relevance, single.relevance) and np.isclose(t.logit, single.logit, rtol=1e-6)


def test_token_string_target_and_position(attributors):
    a = attributors["llama"]
    mat = a.tokenizer.token_id("mat")
    by_name, by_id = a.attribute(TEXTS[0], target="mat"), a.attribute(TEXTS[0], target=mat)
    assert by_name.target == mat and close(by_name.relevance, by_id.relevance)
    early = a.attribute(TEXTS[0], target=mat, position=2)
    assert early.position == 2
    assert np.all(early.relevance[3:] == 0)            # causal: later tokens cannot matter
    assert np.any(early.relevance[:3] != 0)
    assert a.attribute(TEXTS[0], target=mat, position=-1).position == len(by_name.tokens) - 1


def test_bad_targets_are_one_line_errors(attributors):
    a = attributors["bert"]
    with pytest.raises(lrpc.LrpcError, match="out of range"):
        a.attribute(TEXTS[0], target=7)
    with pytest.raises(lrpc.LrpcError, match="position"):
        a.attribute(TEXTS[0], position=1)
    with pytest.raises(lrpc.LrpcError, match="not one|tokens"):
        attributors["llama"].attribute(TEXTS[0], target="cat sat")


# ---- batching with padding ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_padded_batch_equals_single_runs_and_padding_gets_exactly_zero(name, attributors):
    a = attributors[name]
    batch = a.attribute(TEXTS, target=1)
    for text, row in zip(TEXTS, batch):
        single = a.attribute(text, target=1)
        assert row.tokens == single.tokens
        assert close(row.relevance, single.relevance) and np.isclose(row.logit, single.logit, rtol=1e-5)
    # the raw explainer output on the padded batch: padding relevance is exactly 0
    feed, lengths = a.pad(a._items(TEXTS))
    assert len(set(lengths)) > 1 and (feed["attention_mask"] == 0).any()
    seed = np.zeros((len(TEXTS), a._num_classes(feed, None)), np.float32)
    seed[:, 1] = 1
    position = np.array(lengths) - 1 if a.rank == 3 else None
    raw = a.explainer.explain(feed, seed=seed, position=position).relevance["input_ids"]
    for row, length in enumerate(lengths):
        assert np.all(raw[row, length:] == 0.0)
        assert close(raw[row, :length], batch[row].relevance)


def test_dict_inputs_with_a_batch_axis_strip_the_padding(attributors):
    a = attributors["bert"]
    feed, lengths = a.pad(a._items(TEXTS))
    from_arrays = a.attribute(feed, target=0)
    from_text = a.attribute(TEXTS, target=0)
    for x, y, n in zip(from_arrays, from_text, lengths):
        assert x.relevance.shape == (n,) and close(x.relevance, y.relevance)


# ---- latent relevance ----------------------------------------------------------------------------

def _first_layer_input(proto: onnx.ModelProto) -> str:
    """The tensor entering decoder layer 0 from outside it (read from the exporter's name scopes)."""
    produced_inside, made_before = set(), set()
    for node in proto.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if ".layers.0" in scopes:
            for x in node.input:
                if x in made_before and x not in produced_inside:
                    return x
            produced_inside.update(node.output)
        made_before.update(node.output)
    raise AssertionError("no layer 0 found")


def test_latent_at_the_first_decoder_layer_input_equals_the_input_relevance(protos):
    proto = protos["llama"]
    first = _first_layer_input(proto)
    ex = lrpc.Explainer(lrpc.compile(proto, latent=f"^{first}$"))
    assert f"relevance.{first}" in ex.outputs
    ids = np.array([[5, 17, 33, 9, 60, 2]], np.int64)
    out = ex.explain({"input_ids": ids, "attention_mask": np.ones_like(ids)}, target=[7])
    latent = out.relevance[first]
    assert latent.shape == (1, 6, 32)
    assert close(latent.sum(-1), out.relevance["input_ids"], rtol=1e-6)


def test_layers_follow_the_residual_stream(protos, cache):
    stream = residual_stream(protos["llama"])
    assert [label for _, label in stream] == ["embeddings", "layers.0 +1", "layers.0 +2", "layers.1 +1",
                                              "layers.1 +2"]
    a = Attributor(protos["llama"], tokenizer="toy", layers=True, cache=cache)
    r = a.attribute(TEXTS[0], target="mat")
    assert list(r.latent) == [label for _, label in stream]
    assert close(r.latent["embeddings"], r.relevance, rtol=1e-6)
    # the last residual stream feeds a bias-free norm + head: only the explained position holds relevance
    last = r.latent["layers.1 +2"]
    assert np.all(last[:-1] == 0) and np.isclose(last[-1], r.logit, rtol=1e-4)
    labels, matrix = r.layer_matrix()
    assert matrix.shape == (5, len(r.tokens)) and labels[0] == "embeddings"


# ---- images --------------------------------------------------------------------------------------

def test_image_explanation_and_png_overlay(zoo_export, cache, tmp_path):
    from PIL import Image
    proto = zoo_export("hf-vit")[1]
    picture = (np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    a = Attributor(proto, cache=cache)
    r = a.attribute(image=tmp_path / "in.png")
    pixels, original = load_image(tmp_path / "in.png", (32, 32))
    assert pixels.shape == (1, 3, 32, 32) and original.shape == (50, 70, 3)
    reference = a.explainer.explain({"pixel_values": pixels}, seed=np.eye(10, dtype=np.float32)[[r.target]])
    assert r.relevance.shape == (3, 32, 32) and close(r.relevance, reference.relevance["pixel_values"][0])
    out = r.save_png(tmp_path / "heat.png")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (70, 50) and png.mode == "RGB"
        assert np.asarray(png).std() > 0
    html = r.to_html()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")


# ---- caching -------------------------------------------------------------------------------------

def test_compiled_explainers_are_cached_by_model_and_options(protos, tmp_path):
    first, _ = compiled_explainer(protos["bert"], cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    again, _ = compiled_explainer(protos["bert"], cache=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    other, _ = compiled_explainer(protos["bert"], preset="gxi", cache=tmp_path)
    assert other != first and lrpc.Explainer(other).meta["preset"] == "gxi"
    assert lrpc.Explainer(first).meta["seed"] == "vector"


def test_toy_tokenizer_round_trip():
    tok = Tokenizer.toy()
    ids, tokens = tok.encode("The cat sat on the MAT !")
    assert tokens == ["the", "cat", "sat", "on", "the", "mat", "!"] and max(ids) < 128
    assert tok.token(tok.token_id("mat")) == "mat" and tok.pad_id == 0


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture()
def run_cli(capsys, monkeypatch, cache):
    """`lrpc ARGS` in this process (the console script itself runs in one subprocess test below)."""
    from lrpc.cli import main
    monkeypatch.setenv("LRPC_CACHE", str(cache))

    def run(*args, env=None):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture(scope="module")
def llama_file(protos, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "llama.onnx"
    onnx.save(protos["llama"], path)
    return path


def test_cli_json_html_png_match_the_api(llama_file, cache, tmp_path, attributors):
    import os
    html, png = tmp_path / "r.html", tmp_path / "layers.png"
    args = ("explain", llama_file, "--tokenizer", "toy", "--text", TEXTS[0], "--target", "mat", "--contrast", "dog",
            "--layers", "--json", "--html", html, "--png", png)
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "LRPC_CACHE": str(cache)})
    rc, out, err = proc.returncode, proc.stdout, proc.stderr
    assert rc == 0, err
    doc = json.loads(out)
    api = attributors["llama"].attribute(TEXTS[0], target="mat", contrast="dog")
    assert doc["tokens"] == api.tokens and close(doc["relevance"], api.relevance)
    assert np.isclose(doc["logit"], api.logit, rtol=1e-5)
    assert np.isclose(doc["conservation"]["relevance_sum"], api.conservation, rtol=1e-5)
    assert list(doc["layers"]) == ["embeddings", "layers.0 +1", "layers.0 +2", "layers.1 +1", "layers.1 +2"]
    text = html.read_text()
    assert "&#x27;mat&#x27; (" in text and "&#x27;dog&#x27;" in text
    for token, value in zip(api.tokens, api.relevance):
        assert f"title='{token}: {value:+.6f}'" in text
    from PIL import Image
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size[0] > 100


def test_cli_terminal_top_k_and_jsonl_file(llama_file, run_cli, tmp_path, attributors):
    rc, out, err = run_cli("explain", llama_file, "--tokenizer", "toy", "--text", TEXTS[1], "--top-k", "2")
    assert rc == 0, err
    assert out.count("Σ relevance") == 2 and "vs explained value" in out
    lines = tmp_path / "inputs.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n" + json.dumps(
        {"text": TEXTS[0], "target": "mat", "position": 2}) + "\n")
    rc, out, err = run_cli("explain", llama_file, "--tokenizer", "toy", "--file", lines, "--json")
    assert rc == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 4
    for doc, text in zip(docs, TEXTS):
        assert close(doc["relevance"], attributors["llama"].attribute(text).relevance)
    assert docs[3]["position"] == 2 and all(v == 0 for v in docs[3]["relevance"][3:])


def test_cli_npz_input_and_errors(llama_file, run_cli, tmp_path, attributors):
    a = attributors["llama"]
    feed, _ = a.pad(a._items(TEXTS[:2]))
    np.savez(tmp_path / "in.npz", **feed)
    rc, out, err = run_cli("explain", llama_file, "--input", tmp_path / "in.npz", "--target", "3", "--json")
    assert rc == 0, err
    docs = json.loads(out)
    for doc, text in zip(docs, TEXTS[:2]):
        assert close(doc["relevance"], a.attribute(text, target=3).relevance)
    for args, words in [((), "exactly one"), (("--text", "x", "--top-k", "2", "--target", "1"), "top-k"),
                        (("--text", "the cat"), "tokenizer")]:
        rc, _, err = run_cli("explain", llama_file, *args)
        assert rc == 2 and err.startswith("lrpc: error:") and len(err.strip().splitlines()) == 1, err
        assert words in err


def test_plan_tensors_lists_latent_names(llama_file, run_cli, protos):
    rc, out, err = run_cli("plan", llama_file, "--tensors")
    assert rc == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert "logits" in names and all(n in names for n, _ in residual_stream(protos["llama"]))
