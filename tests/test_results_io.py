"""Results as users meet them: terminal text that shows tokens as they are (no rich markup), one total in
every output, JSON text that reads back, and the HTML report inline in notebooks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from rich.console import Console

import lrpc
from lrpc.results import Attribution, Attributions


def attribution() -> Attribution:
    """A BERT-like explanation: token ids and token-type ids both carry relevance."""
    ids = np.array([0.5, -0.25, 0.125, 0.0625])
    types = np.array([0.03125, 0.015625, 0.0, 0.0])
    return Attribution(relevance=ids, tokens=["[CLS]", "[unused102]", "[/bold]", "[SEP]"], target=1,
                       logit=0.75, target_label="[unused102]", input_name="input_ids",
                       relevances={"input_ids": ids, "token_type_ids": types}, title="a [b] c")


def shown(a: Attribution) -> str:
    console = Console(record=True, width=200, color_system=None)
    a.show(console)
    return console.export_text()


def test_terminal_shows_bracketed_tokens_and_labels_verbatim():
    text = shown(attribution())
    assert "[unused102]:" in text and "([unused102]: logit" in text   # the token and the target label
    assert "[/bold]" in text and "a [b] c" in text


def test_the_total_is_the_same_in_the_terminal_json_and_conservation():
    a = attribution()
    expected = 0.5 - 0.25 + 0.125 + 0.0625 + 0.03125 + 0.015625   # every attributed input, by hand
    assert a.conservation == expected
    total = float(re.search(r"Σ relevance = ([+-][0-9.]+)", shown(a)).group(1))
    assert total == round(expected, 4)
    assert json.loads(a.to_json())["conservation"]["relevance_sum"] == expected
    html_total = re.search(r"Σ relevance = ([+-][0-9.]+)", a.to_html()).group(1)
    assert float(html_total) == round(expected, 5)                        # the HTML report says the same


def test_the_total_reads_back_with_the_token_type_share(tmp_path):
    a = attribution()
    path = tmp_path / "r.json"
    path.write_text(a.to_json())
    back = lrpc.load_results(path)[0]
    assert back.conservation == pytest.approx(a.conservation, abs=1e-7)   # not only Σ of the token relevance
    np.testing.assert_array_equal(back.relevance, a.relevance)


def test_json_text_reads_back(tmp_path):
    results = Attributions([attribution(), attribution()])
    path = tmp_path / "r.json"
    path.write_text(results.to_json())
    back = lrpc.load_results(path)
    assert len(back) == 2
    np.testing.assert_array_equal(back[0].relevance, results[0].relevance)
    assert (back[1].tokens, back[1].target, back[1].logit, back[1].target_label) == \
        (results[1].tokens, 1, 0.75, "[unused102]")
    one = tmp_path / "one.json"
    one.write_text(results[0].to_json())
    assert len(lrpc.load_results(one)) == 1


def test_repr_html_is_the_report():
    a = attribution()
    assert a._repr_html_() == a.to_html()
    assert Attributions([a])._repr_html_() == Attributions([a]).to_html()
