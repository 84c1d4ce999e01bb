"""Concept atlases (`lrpc concepts build / explain`, lrpc/atlas.py): the streamed top-k against a brute-force
pass held in memory, byte-identical resume after an interrupt, and one-line refusals of bad input."""

from __future__ import annotations

import sqlite3

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from lrpc import atlas  # noqa: E402
from lrpc.attributor import Attributor  # noqa: E402
from lrpc.cli import main  # noqa: E402
from lrpc.errors import LrpcError  # noqa: E402

WORDS = "the cat sat on a mat dog ran in park big small red blue house tree".split()
K, BATCH, COMPONENTS = 3, 4, "mlp,heads"


@pytest.fixture(scope="module")
def setup(zoo_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    model = folder / "bert.onnx"
    onnx.save(zoo_export("bert")[1], model)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(19)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    options = dict(components=COMPONENTS, k=K, batch_size=BATCH, tokenizer="toy", cache=folder / "cache",
                   progress=False)
    reference = atlas.build(model, corpus, folder / "reference.atlas", **options)
    return folder, model, corpus, texts, options, reference


def rows(path, component, layer, unit, kind):
    with sqlite3.connect(path) as db:   # the atlas is plain SQLite: read without lrpc
        return db.execute("SELECT r.sample, r.position, r.score, s.text FROM refs r JOIN samples s ON s.id = r.sample "
                          "WHERE component = ? AND layer = ? AND unit = ? AND kind = ? ORDER BY rank",
                          (component, layer, unit, kind)).fetchall()


def test_top_k_equals_brute_force(setup):
    folder, model, _, texts, options, reference = setup
    attributor = Attributor(str(model), tokenizer="toy", components=COMPONENTS, cache=options["cache"])
    scores = [attributor.unit_scores(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
    book = atlas.Atlas(reference, model=model)
    assert book.components == {"mlp.0": 64, "mlp.1": 64, "heads.0": 4, "heads.1": 4}
    for name, units in book.components.items():
        kind_name, layer = name.split(".")
        for kind in atlas.KINDS:
            score = np.concatenate([s[name][kind] for s in scores])          # [samples, units], all in memory
            position = np.concatenate([s[name][kind + "_pos"] for s in scores])
            for unit in range(units):
                best = sorted(range(len(texts)), key=lambda i: (-score[i, unit], i))[:K]
                want = [(i, int(position[i, unit]), float(score[i, unit]), texts[i]) for i in best]
                assert rows(reference, kind_name, int(layer), unit, kind) == want, (name, kind, unit)
                assert book.references(name, unit, kind) == [(t, p, s) for _, p, s, t in want]
    # the RelMax score is the unit's relevance for the sample's own prediction (padding aside)
    alone = attributor.components(texts[5])
    np.testing.assert_allclose(alone["mlp.1"][0], scores[1]["mlp.1"]["rel"][1], rtol=1e-4, atol=1e-6)


def test_interrupted_build_resumes_byte_identical(setup, monkeypatch):
    folder, model, corpus, _, options, reference = setup
    out = folder / "resumed.atlas"
    real, calls = Attributor.unit_scores, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(Attributor, "unit_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atlas.build(model, corpus, out, **options)
    assert not out.exists() and (folder / "resumed.atlas.partial.npz").is_file()
    seen = []
    monkeypatch.setattr(Attributor, "unit_scores", lambda *a: seen.append(1) or real(*a))
    atlas.build(model, corpus, out, **options)
    assert len(seen) == 3   # 5 batches: 2 done before the interrupt, 3 after
    assert out.read_bytes() == reference.read_bytes()
    assert not (folder / "resumed.atlas.partial.npz").exists()


def test_bad_input_is_one_line_and_writes_nothing(setup, capsys):
    folder, model, corpus, _, options, reference = setup
    out = folder / "bad.atlas"
    base = ["concepts", "build", str(model), "--tokenizer", "toy", "-o", str(out), "--quiet"]
    bad_jsonl = folder / "bad.jsonl"
    bad_jsonl.write_text('{"text": "the cat"}\n{"text": "a dog"\n')
    for extra, words in [(["--corpus", str(corpus), "--components", "mlp,neurons"], "unknown component selector"),
                         (["--corpus", str(bad_jsonl)], "bad.jsonl:2: not JSON")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists() and not (folder / "bad.atlas.partial.npz").exists()
    other = folder / "other.onnx"
    proto = onnx.load(model)
    proto.doc_string = "another model"
    onnx.save(proto, other)
    with pytest.raises(LrpcError, match="was built from another model"):
        atlas.Atlas(reference, model=other)
    damaged = folder / "damaged.atlas"
    data = reference.read_bytes()
    damaged.write_bytes(data[:100] + bytes(200) + data[300:])
    with pytest.raises(LrpcError, match="not a readable lrpc atlas"):
        atlas.Atlas(damaged, model=model)
    assert main(["concepts", "explain", str(model), "--atlas", str(damaged), "--text", "the cat"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_explain_heatmaps_are_crp_conditional_relevance(setup, zoo_export):
    """Each reference's heatmap is CRP's R(x | unit) for the reference's own prediction: under gxi,
    E ⊙ (∂c/∂E)ᵀ(mask ⊙ ∂s/∂c) from torch autograd on the zoo module (tests/test_conditional.py's oracle),
    for MLP units and heads alike, the references of a unit run as one padded batch."""
    import torch

    from lrpc.inputs import Tokenizer
    from test_components import taps
    from test_conditional import conditional_oracle, zoo_run
    folder, model, _, _, options, reference = setup
    module = zoo_export("bert")[0]
    book = atlas.Atlas(reference, model=model)
    result = atlas.explain(model, "the big cat sat on the mat", book, top=3, refs=2, tokenizer="toy",
                           cache=options["cache"], preset="gxi")
    assert result["units"] and all(len(u["references"]) == 2 for u in result["units"])
    values = [u["relevance"] for u in result["units"]]
    positive, negative = [v for v in values if v > 0], [v for v in values if v < 0]   # each most extreme first
    assert positive == sorted(positive, reverse=True) and negative == sorted(negative) and positive and negative
    attributor = Attributor(str(model), tokenizer="toy", preset="gxi", components=COMPONENTS, conditions=COMPONENTS,
                            cache=options["cache"])
    texts = ["the cat sat", "a big red house"]   # a head, whether or not the top units include one
    heads = {"component": "heads.1", "unit": 2, "references": [
        {"text": t, "heatmap": h} for t, h in zip(texts, attributor.conditional(texts, "heads.1", 2))]}
    tapped = taps("bert", module)
    for u in result["units"] + [heads]:
        units = book.components[u["component"]]
        for ref in u["references"]:
            ids = torch.tensor([Tokenizer.toy().encode(ref["text"])[0]])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            with torch.no_grad():
                target = [int(module(**inputs)[0].argmax())]
            want = conditional_oracle(zoo_run(module, inputs), tapped[u["component"]][0], units, u["unit"], target,
                                      None)[0]
            assert len(ref["heatmap"]) == len(want)
            assert np.abs(np.array(ref["heatmap"]) - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-12), u


def test_explain_command_json_and_html(setup, monkeypatch, capsys):
    import json
    folder, model, _, _, options, reference = setup
    monkeypatch.setenv("LRPC_CACHE", str(options["cache"]))   # the explainers compiled above
    html = folder / "concepts.html"
    base = ["concepts", "explain", str(model), "--atlas", str(reference), "--text", "the big <b>cat</b> sat on the mat",
            "--tokenizer", "toy", "--preset", "gxi", "--top", "1", "--refs", "1"]
    assert main(base + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = doc["units"][0]["references"][0]
    assert doc["text"] == "the big <b>cat</b> sat on the mat" and len(ref["tokens"]) == len(ref["heatmap"]) > 0
    assert main(base + ["--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert doc["units"][0]["component"] in out and "reference 1" in out
    page = html.read_text()
    assert "<html" in page.lower() and "src=\"http" not in page and doc["units"][0]["component"] in page
    assert "<b>cat" not in page and "&lt;b&gt;cat" in page and "conditional heatmap" in page   # escaped
