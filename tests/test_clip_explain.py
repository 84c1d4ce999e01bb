"""`lrpc explain clip --image … --text …` and `lrpc.Similarity`: a dual encoder's image–text similarity
explained over the image and over the text, through the user path (zoo name → both towers exported,
compiled with a vector seed, cached). Values are checked against torch autograd on the zoo's own tower
modules (gxi: x ⊙ ∂s/∂x; a token's relevance is its embedding row ⊙ the gradient there, summed); the
explained value against the cosine similarity torch computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import lrpc  # noqa: E402
from lrpc import models  # noqa: E402
from lrpc.inputs import Tokenizer, load_image  # noqa: E402

TEXT, TOL = "a cat sat on the mat", 1e-4


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "cat.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(picture):
    """The zoo towers in torch, their inputs for `picture` and TEXT, and the two embeddings."""
    image_tower, _ = models.get("clip-image").build()
    text_tower, _ = models.get("clip-text").build()
    pixels = torch.from_numpy(load_image(picture, (32, 32))[0])
    ids = torch.tensor([Tokenizer.toy().encode(TEXT)[0]])
    with torch.no_grad():
        e_image, e_text = image_tower(pixels), text_tower(ids)
    return image_tower, text_tower, pixels, ids, e_image, e_text


def autograd_image(tower, pixels, seed):
    x = pixels.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((tower(x) * seed).sum(), x)
    return (x * grad)[0].detach().numpy()


def autograd_text(tower, ids, seed):
    captured = {}
    embedding = tower.hf_model.text_model.embeddings.token_embedding
    hook = embedding.register_forward_hook(lambda module, args, out: captured.setdefault("e", out.retain_grad() or out))
    try:
        (tower(ids) * seed).sum().backward()
    finally:
        hook.remove()
    e = captured["e"]
    return (e * e.grad).sum(-1)[0].detach().numpy()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "relevance has NaN/inf"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def test_gxi_equals_autograd_on_both_towers_through_the_api(picture, cache, reference):
    image_tower, text_tower, pixels, ids, e_image, e_text = reference
    image, text = lrpc.Similarity("clip", preset="gxi", cache=cache).attribute(picture, TEXT)
    similarity = float((e_image * e_text).sum())
    assert image.logit == pytest.approx(similarity, rel=1e-4, abs=1e-6)
    assert text.logit == pytest.approx(similarity, rel=1e-4, abs=1e-6)
    assert image.relevance.shape == (3, 32, 32) and image.image is not None
    assert rel_err(image.relevance, autograd_image(image_tower, pixels, e_text)) <= TOL
    assert text.tokens == TEXT.split()
    assert rel_err(text.relevance, autograd_text(text_tower, ids, e_image)) <= TOL
    assert "similarity with" in image.target_label and image.target is None


def test_attnlrp_both_directions_and_one_tower(picture, cache, reference):
    """lrpc.explain with image and text: the AttnLRP explainers of both towers, the same explained value;
    towers=("text",) gives the text direction alone, equal to the pair's."""
    e_image, e_text = reference[4], reference[5]
    both = lrpc.explain("clip", image=picture, text=TEXT, cache=cache)
    assert len(both) == 2 and all(np.all(np.isfinite(a.relevance)) for a in both)
    assert both[0].logit == pytest.approx(float((e_image * e_text).sum()), rel=1e-4, abs=1e-6)
    (text,) = lrpc.explain("clip", image=picture, text=TEXT, cache=cache, towers=("text",))
    np.testing.assert_allclose(text.relevance, both[1].relevance, rtol=1e-6, atol=1e-9)
    assert not np.allclose(both[1].relevance, lrpc.Similarity("clip", preset="gxi", cache=cache)
                           .attribute(picture, TEXT, towers=("text",))[0].relevance)   # AttnLRP ≠ gxi here


def test_cli_terminal_html_png_and_errors(picture, cache, reference, tmp_path, capsys, monkeypatch):
    from lrpc.cli import main
    monkeypatch.setenv("LRPC_CACHE", str(cache))
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    rc = main(["explain", "clip", "--image", str(picture), "--text", TEXT, "--html", str(html), "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("Σ relevance") == 2, out   # the conservation line of each direction
    assert "similarity with 'a cat sat on the mat'" in out and "similarity with cat.png" in out
    assert "data:image/png;base64," in html.read_text()
    assert (tmp_path / "r-0.png").is_file() and (tmp_path / "r-1.png").is_file()

    rc = main(["explain", "clip", "--image", str(picture), "--text", TEXT, "--towers", "image", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["conservation"]["explained_value"] == pytest.approx(
        float((reference[4] * reference[5]).sum()), rel=1e-4, abs=1e-6)

    for args, message in [(["hf-vit"], "not an image–text dual encoder"),
                          (["clip", "--target", "3"], "drop --target")]:
        rc = main(["explain", *args, "--image", str(picture), "--text", TEXT])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err
