"""Explanations people can look at: a terminal heatmap (rich) and a self-contained HTML report.

Colours are diverging and centred at zero: red for positive relevance (evidence for the explained
value), blue for negative; intensity is |R| / max|R| of the row shown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenRow:
    """One explained sequence: its tokens, their relevance, and what was explained."""

    title: str
    tokens: list[str]
    relevance: np.ndarray
    explained: str = ""       # e.g. "cosine similarity 0.61" or "logit[positive] = 2.3"
    value: float | None = None


def _rgb(r: float, scale: float) -> tuple[int, int, int]:
    t = 0.0 if scale == 0 else max(-1.0, min(1.0, r / scale))
    if t >= 0:   # white → red
        return 255, int(255 * (1 - 0.75 * t)), int(255 * (1 - 0.75 * t))
    t = -t       # white → blue
    return int(255 * (1 - 0.75 * t)), int(255 * (1 - 0.6 * t)), 255


def display_tokens(tokens: list[str]) -> list[str]:
    """WordPiece '##' continuations and SentencePiece/BPE word markers as a reader expects them."""
    return [t[2:] if t.startswith("##") else t.replace("Ġ", " ").replace("▁", " ") for t in tokens]


def terminal(rows: list[TokenRow], console=None) -> None:
    from rich.console import Console
    from rich.text import Text
    console = console or Console()
    for row in rows:
        scale = float(np.abs(row.relevance).max()) if row.relevance.size else 0.0
        text = Text()
        for token, r in zip(display_tokens(row.tokens), row.relevance):
            red, green, blue = _rgb(float(r), scale)
            text.append(f" {token} ", style=f"black on rgb({red},{green},{blue})")
            text.append(" ")
        console.print(f"[bold]{row.title}[/bold]" + (f"  ({row.explained})" if row.explained else ""))
        console.print(text)
        values = "  ".join(f"{t}:{r:+.3f}" for t, r in zip(display_tokens(row.tokens), row.relevance))
        console.print(f"[dim]{values}[/dim]")
        total = float(row.relevance.sum())
        conservation = f"Σ relevance = {total:+.4f}"
        if row.value is not None:
            conservation += f"  vs explained value {row.value:+.4f}"
            if row.value != 0:
                conservation += f" (ratio {total / row.value:.3f})"
        console.print(conservation + "\n")


def html_report(rows: list[TokenRow], title: str, summary: str = "") -> str:
    """One self-contained HTML page (inline CSS, no scripts, no network): tokens coloured by relevance,
    exact values on hover, the explained target and value, and conservation per row."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
             ".tok{display:inline-block;padding:2px 4px;margin:2px;border-radius:3px;font-family:monospace}"
             ".row{margin-bottom:1.5em}.meta{color:#555;font-size:90%}"
             "table{border-collapse:collapse;font-size:85%}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f"<p>{html.escape(summary)}</p>")
    parts.append("<p class='meta'>Red: relevance for the explained value; blue: against it. "
                 "Hover a token for its exact relevance.</p>")
    for row in rows:
        scale = float(np.abs(row.relevance).max()) if row.relevance.size else 0.0
        parts.append(f"<div class='row'><h2>{html.escape(row.title)}</h2>")
        if row.explained:
            parts.append(f"<p class='meta'>explained: {html.escape(row.explained)}</p>")
        spans = []
        for token, shown, r in zip(row.tokens, display_tokens(row.tokens), row.relevance):
            red, green, blue = _rgb(float(r), scale)
            spans.append(f"<span class='tok' style='background:rgb({red},{green},{blue})' "
                         f"title='{html.escape(token)}: {float(r):+.6f}' data-relevance='{float(r):.8g}'>"
                         f"{html.escape(shown)}</span>")
        parts.append("<div>" + "".join(spans) + "</div>")
        total = float(row.relevance.sum())
        conservation = f"Σ relevance = {total:+.5f}"
        if row.value is not None:
            conservation += f"; explained value = {row.value:+.5f}"
        parts.append(f"<p class='meta'>{conservation}</p>")
        parts.append("<table><tr><th>token</th><th>relevance</th></tr>" + "".join(
            f"<tr><td>{html.escape(t)}</td><td>{float(r):+.6f}</td></tr>" for t, r in zip(row.tokens, row.relevance))
            + "</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
