"""The pictures: terminal heatmap colours, the offline HTML report, PNGs of the right size."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from lrpc import viz


def test_colours_diverge_and_are_centred_at_zero():
    assert viz._rgb(0.0, 1.0) == (255, 255, 255)
    red, blue = viz._rgb(1.0, 1.0), viz._rgb(-1.0, 1.0)
    assert red[0] == 255 and red[1] < 100 and red[2] < 100
    assert blue[2] == 255 and blue[0] < 100
    assert viz._rgb(0.5, 1.0)[1] > red[1]   # intensity grows with |R|


def test_terminal_heatmap_colours_each_token_and_shows_conservation():
    from rich.console import Console
    console = Console(record=True, width=120, color_system="truecolor")
    row = viz.TokenRow("t", ["good", "bad", "##ly"], np.array([1.0, -0.5, 0.0]), "class 1", 0.8)
    viz.terminal([row], console)
    text = console.export_text(clear=False)
    assert "Σ relevance = +0.5000" in text and "explained value +0.8000" in text and "ratio 0.625" in text
    styles = console.export_html(inline_styles=True)
    assert "background-color: #ff3f3f" in styles      # +1.0: full red
    assert "background-color: #9fb2ff" in styles       # −0.5: half blue
    assert "ly" in text and "##ly" not in text.split("\n")[1]


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.current, self.external = [], None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "link", "iframe") or any(v and re.match(r"\s*(https?:)?//", v) for v in attrs.values()):
            self.external.append((tag, attrs))
        if tag == "span" and "data-relevance" in attrs:
            self.current = [attrs, ""]

    def handle_data(self, data):
        if self.current is not None:
            self.current[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.spans.append(tuple(self.current))
            self.current = None


def test_html_report_is_offline_and_holds_every_token_with_its_value():
    tokens = ["<s>", "the", "Ġcat", "'quoted'", "&"]
    relevance = np.array([0.0, 0.25, -1.5, 3e-7, 2.0])
    page = viz.html_report([viz.TokenRow("row <1>", tokens, relevance, "'mat' (7): logit +1.2", 1.2)],
                           "report", "summary")
    parser = _Spans()
    parser.feed(page)
    assert parser.external == []
    assert len(parser.spans) == len(tokens)
    for (attrs, shown), token, r in zip(parser.spans, tokens, relevance):
        assert float(attrs["data-relevance"]) == pytest.approx(r, rel=1e-6, abs=1e-12)
        assert attrs["title"] == f"{token}: {r:+.6f}"                    # the value on hover
        assert shown == viz.display_tokens([token])[0]
    assert "row &lt;1&gt;" in page and "explained: &#x27;mat&#x27; (7): logit +1.2" in page
    assert "Σ relevance = +0.75000  vs explained value +1.20000" in page


def test_html_report_embeds_images_inline():
    from PIL import Image
    png = viz.image_overlay_png(np.ones((4, 4)), None, scale=2)
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    page = viz.html_report([], "images", images=[("cat", png, 0.5, 1.0)],
                           layers=[("x", ["a", "b"], ["t1", "t2"], np.array([[1.0, -1.0], [0.5, 0.0]]))])
    assert page.count("src='data:image/png;base64,") == 2 and "http" not in page


def test_image_overlay_size_and_centring():
    from PIL import Image
    picture = np.full((30, 40, 3), 128, np.uint8)
    heat = np.zeros((8, 8))
    heat[:4, :] = 1.0      # top: positive
    heat[4:, :4] = -1.0    # bottom left: negative, bottom right: zero
    out = viz.image_overlay(heat, picture)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    top, bottom_left, bottom_right = out[2, 20], out[28, 2], out[28, 38]
    assert top[0] > top[2] + 50                       # red
    assert bottom_left[2] > bottom_left[0] + 50       # blue
    assert abs(int(bottom_right[0]) - int(bottom_right[2])) <= 2   # zero: the grey picture, no tint
    assert viz.image_overlay(heat, None, scale=3).shape == (24, 24, 3)
    assert Image.fromarray(out).size == (40, 30)


def test_png_files_are_real_images(tmp_path):
    from PIL import Image
    path = viz.save_image_overlay(tmp_path / "o.png", np.random.RandomState(0).randn(32, 32),
                                  np.zeros((64, 96, 3), np.uint8), title="class 3")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (96, 64) and png.text.get("Description") == "lrpc relevance: class 3"
    path = viz.save_layers_png(tmp_path / "l.png", ["embeddings", "layers.0"], ["a", "b", "c"],
                               np.array([[1.0, 0.0, -1.0], [0.2, 0.3, 0.0]]), title="t")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] >= 300 and png.size[1] >= 150
    assert not list(tmp_path.glob(".*tmp*"))
