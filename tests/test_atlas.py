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
                assert book.references(name, unit, kind) == [(t, p, s, i) for i, p, s, t in want]
    # the RelMax score is the unit's relevance for the sample's own prediction (padding aside)
    alone = attributor.components(texts[5])
    np.testing.assert_allclose(alone["mlp.1"][0], scores[1]["mlp.1"]["rel"][1], rtol=1e-4, atol=1e-6)


def interrupt_third_batch(monkeypatch):
    """Make the build's third batch raise KeyboardInterrupt (an interrupt); returns the real method."""
    real, calls = Attributor.unit_scores, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(Attributor, "unit_scores", interrupted)
    return real


def test_interrupted_build_resumes_byte_identical(setup, monkeypatch):
    folder, model, corpus, _, options, reference = setup
    out = folder / "resumed.atlas"
    real = interrupt_third_batch(monkeypatch)
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


IMAGES, IMAGE_K, IMAGE_BATCH = 14, 3, 4


@pytest.fixture(scope="module")
def image_setup(zoo_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-atlas")
    module, proto = zoo_export("hf-vit")
    model = folder / "vit.onnx"
    onnx.save(proto, model)
    images = np.random.default_rng(3).standard_normal((IMAGES, 3, 32, 32)).astype(np.float32)
    corpus = folder / "images.npz"
    np.savez(corpus, images=images, labels=np.arange(IMAGES) % 5)
    return folder, module, model, corpus, images


def test_image_corpus_top_k_equals_torch_brute_force(image_setup, monkeypatch):
    """An .npz image corpus, streamed a row at a time, gives the atlas a brute-force pass over all images
    in torch gives: ActMax (the MLP unit's largest GELU output; a head's largest output norm) and, under
    gxi, RelMax (Σ positions act · ∂logit[predicted]/∂act from autograd), per unit the top k in order.
    An interrupted build resumes to the same bytes."""
    import torch
    folder, module, model, corpus, images = image_setup
    options = dict(components="mlp,heads", k=IMAGE_K, batch_size=IMAGE_BATCH, preset="gxi", cache=folder / "cache",
                   progress=False)
    out = atlas.build(model, corpus, folder / "vit.atlas", **options)
    real = interrupt_third_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        atlas.build(model, corpus, folder / "resumed.atlas", **options)
    monkeypatch.setattr(Attributor, "unit_scores", real)
    assert atlas.build(model, corpus, folder / "resumed.atlas", **options).read_bytes() == out.read_bytes()
    seen = {}
    hooks = [hook for i, layer in enumerate(module.hf_model.vit.layers) for hook in (
        layer.mlp.activation_fn.register_forward_hook(lambda _m, _a, o, i=i: seen.__setitem__(f"mlp.{i}", o)),
        layer.attention.o_proj.register_forward_pre_hook(   # the heads' outputs [b, seq, heads · head_dim]
            lambda _m, a, i=i: seen.__setitem__(f"heads.{i}", a[0])))]
    try:
        logits = module(torch.from_numpy(images))
        chosen = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()   # each image's own prediction
        grads = torch.autograd.grad(chosen, [seen[n] for n in sorted(seen)])
    finally:
        for h in hooks:
            h.remove()
    book = atlas.Atlas(out, model=model)
    assert book.components == {"mlp.0": 64, "mlp.1": 64, "heads.0": 4, "heads.1": 4}
    assert book.meta["images"] == "images" and book.meta["samples"] == IMAGES
    for name, grad in zip(sorted(seen), grads):
        act, rel = seen[name].detach(), seen[name].detach() * grad
        if name.startswith("heads"):   # [b, seq, heads, head_dim]: a head's activation is its output norm
            act = act.reshape(*act.shape[:2], 4, -1).norm(dim=-1)
            rel = rel.reshape(*rel.shape[:2], 4, -1).sum(-1)
        want = {"act": act.amax(1).numpy(), "rel": rel.sum(1).numpy()}                # [images, units]
        want_pos = {"act": act.argmax(1).numpy(), "rel": rel.abs().argmax(1).numpy()}
        for kind in atlas.KINDS:
            for unit in range(book.components[name]):
                got = rows(out, *name.split("."), unit, kind)
                score = want[kind][:, unit]
                best = np.sort(score)[::-1][:IMAGE_K]
                tol = 1e-4 * np.abs(score).max()
                for (sample, position, value, text), expected in zip(got, best):
                    assert abs(value - expected) <= tol and abs(score[sample] - value) <= tol, (name, kind, unit)
                    assert text == f"image {sample} (label {sample % 5})"
                    if kind == "act" or name.startswith("mlp"):
                        assert position == want_pos[kind][sample, unit], (name, kind, unit)
                assert len(got) == IMAGE_K


def test_bad_image_corpus_is_one_line_and_writes_nothing(image_setup, setup, capsys):
    folder, _, model, corpus, images = image_setup
    out = folder / "bad.atlas"
    text_model = setup[1]
    assert main(["concepts", "build", str(text_model), "--corpus", str(corpus), "-o", str(out), "--quiet",
                 "--tokenizer", "toy", "--preset", "gxi"]) == 2
    assert "needs a model with an image input" in capsys.readouterr().err
    cases = {
        "keys.npz": (dict(pixels=images), "no array 'images' or 'pixel_values' (it has pixels)"),
        "dtype.npz": (dict(images=(images * 0).astype(np.uint8)), "holds uint8, not floats"),
        "shape.npz": (dict(images=images[:, :, :16]), "is shaped [14, 3, 16, 32]; the model takes images [N, 3, 32, 32]"),
        "rank.npz": (dict(images=images[:, 0]), "is shaped [14, 32, 32]"),
        "labels.npz": (dict(images=images, labels=np.zeros(3, np.int64)), "give one integer per image ([14])"),
    }
    for name, (arrays, words) in cases.items():
        np.savez(folder / name, **arrays)
    (folder / "broken.npz").write_bytes(corpus.read_bytes()[:200])
    cases["broken.npz"] = (None, "is not a readable .npz archive")
    for name, (_, words) in cases.items():
        assert main(["concepts", "build", str(model), "--corpus", str(folder / name), "-o", str(out), "--quiet",
                     "--preset", "gxi"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists() and not (folder / "bad.atlas.partial.npz").exists()


def vit_conditional_oracle(module, pixels: np.ndarray, component: str, unit: int) -> np.ndarray:
    """gxi's R(x | unit) on the torch ViT: ĝ_c = ∂logit[predicted]/∂c masked to the unit (a head's head_dim
    columns together), ĝ_x = (∂c/∂x)ᵀ(mask ⊙ ĝ_c), R = Σ_channels x ⊙ ĝ_x → [H, W]."""
    import torch
    kind, layer = component.split(".")
    block = module.hf_model.vit.layers[int(layer)]
    seen = {}
    if kind == "mlp":   # the GELU output; a head: the o_proj input [b, seq, heads · head_dim]
        handle = block.mlp.activation_fn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("c", out))
    else:
        handle = block.attention.o_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("c", a[0]))
    x = torch.from_numpy(pixels).requires_grad_(True)
    try:
        y = module(x)
    finally:
        handle.remove()
    c = seen["c"]
    units = 4 if kind == "heads" else c.shape[-1]
    mask = torch.zeros(units)
    mask[unit] = 1.0
    (g_c,) = torch.autograd.grad(y[0, y[0].argmax()], c, retain_graph=True)
    (g_x,) = torch.autograd.grad(c, x, g_c * mask.repeat_interleave(c.shape[-1] // units))
    return (x * g_x).sum(1)[0].detach().numpy()


@pytest.fixture(scope="module")
def image_atlas(image_setup):
    folder, module, model, corpus, images = image_setup
    cache = folder / "cache"
    book = atlas.build(model, corpus, folder / "explain.atlas", components="mlp,heads", k=2, batch_size=7,
                       preset="gxi", cache=cache, progress=False)
    explained = folder / "explained.npy"
    np.save(explained, np.random.default_rng(5).standard_normal((3, 32, 32)).astype(np.float32))
    return folder, module, model, corpus, images, book, explained, cache


def test_image_explain_heatmaps_are_crp_conditional_relevance(image_atlas):
    """An image atlas's references come from its .npz by sample id; each reference's heatmap [H, W] is gxi's
    R(x | unit) for the image's own prediction from torch autograd, for MLP units and heads alike."""
    folder, module, model, corpus, images, out, explained, cache = image_atlas
    book = atlas.Atlas(out, model=model)
    result = atlas.explain(model, None, book, image=explained, corpus=corpus, top=2, refs=2, preset="gxi",
                           cache=cache, pictures=True)
    assert result["image"] == str(explained) and result["units"]
    attributor = Attributor(str(model), preset="gxi", components="mlp,heads", conditions="mlp,heads", cache=cache)
    pixels = [{"pixel_values": images[i][None]} for i in (4, 9)]   # a head, whether or not the top units include one
    heads = {"component": "heads.1", "unit": 2, "references": [
        {"sample": i, "heatmap": h.sum(0)} for i, h in zip((4, 9), attributor.conditional(pixels, "heads.1", 2))]}
    checked = 0
    for u in result["units"] + [heads]:
        for rank, ref in enumerate(u["references"]):
            if u is not heads:
                assert (ref["text"], ref["sample"]) == (book.references(u["component"], u["unit"])[rank].text,
                                                        book.references(u["component"], u["unit"])[rank].sample)
                assert ref["text"].startswith(f"image {ref['sample']} ") and ref["picture"].shape == (32, 32, 3)
            want = vit_conditional_oracle(module, images[ref["sample"]][None], u["component"], u["unit"])
            got = np.array(ref["heatmap"])
            assert got.shape == want.shape == (32, 32)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (u["component"], u["unit"])
            checked += 1
    assert checked >= 4


def test_image_explain_command_terminal_json_html(image_atlas, monkeypatch, capsys):
    import json
    folder, _, model, corpus, _, out, explained, cache = image_atlas
    monkeypatch.setenv("LRPC_CACHE", str(cache))   # the explainers compiled above
    html = folder / "concepts.html"
    base = ["concepts", "explain", str(model), "--atlas", str(out), "--image", str(explained), "--corpus", str(corpus),
            "--preset", "gxi", "--top", "1", "--refs", "2"]
    assert main(base + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = doc["units"][0]["references"][0]
    assert doc["image"] == str(explained) and "picture" not in ref
    assert np.array(ref["heatmap"]).shape == (32, 32)
    assert ref["text"] == f"image {ref['sample']} (label {ref['sample'] % 5})"
    assert main(base + ["--html", str(html)]) == 0
    text = capsys.readouterr().out
    assert doc["units"][0]["component"] in text and "reference 2" in text and "Σ relevance" in text and "peak" in text
    page = html.read_text()
    assert page.count("src='data:image/png;base64,") == sum(len(u["references"]) for u in doc["units"])
    assert "src=\"http" not in page and "<script" not in page and ref["text"] in page
    from PIL import Image   # a picture file is resized and normalised by the Attributor
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / "cat.png")
    assert main(base[:5] + ["--image", str(folder / "cat.png")] + base[7:] + ["--json"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["units"][0]["references"][0]["heatmap"]).shape == (32, 32)


def test_image_explain_bad_input_is_one_line_and_writes_nothing(image_atlas, setup, capsys):
    folder, _, model, corpus, images, out, explained, cache = image_atlas
    html = folder / "bad.html"
    np.save(folder / "small.npy", images[0][:, :16])
    np.savez(folder / "other.npz", images=images[::-1], labels=np.arange(IMAGES) % 5)
    base = ["concepts", "explain", str(model), "--atlas", str(out), "--preset", "gxi", "--html", str(html)]
    cases = {
        "image of the wrong shape": (["--image", str(folder / "small.npy"), "--corpus", str(corpus)],
                                     "the image is float32 [3, 16, 32]; the model takes floats [3, 32, 32]"),
        "no corpus": (["--image", str(explained)], "was built from the image corpus images.npz: pass it with --corpus"),
        "missing corpus": (["--image", str(explained), "--corpus", str(folder / "gone.npz")],
                           "gone.npz does not exist; pass images.npz"),
        "another corpus": (["--image", str(explained), "--corpus", str(folder / "other.npz")],
                           "is not the images.npz that"),
        "a text": (["--text", "a cat", "--corpus", str(corpus)], "was built from images: explain an image (--image)"),
        "missing image": (["--image", str(folder / "gone.png"), "--corpus", str(corpus)], "gone.png does not exist"),
    }
    for what, (extra, words) in cases.items():
        assert main(base + extra) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (what, err)
        assert not html.exists(), what
    text_model, text_atlas = setup[1], setup[5]
    assert main(["concepts", "explain", str(model), "--atlas", str(text_atlas), "--image", str(explained), "--corpus",
                 str(corpus), "--preset", "gxi", "--html", str(html)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was built from another model" in err and not html.exists()
    assert main(["concepts", "explain", str(text_model), "--atlas", str(text_atlas), "--image", str(explained),
                 "--tokenizer", "toy", "--preset", "gxi", "--html", str(html)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "built from a text corpus" in err and not html.exists()
