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
    total: float | None = None  # Σ relevance over every attributed input (default: these tokens')


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
    from rich.markup import escape
    from rich.text import Text
    console = console or Console()
    for row in rows:
        scale = float(np.abs(row.relevance).max()) if row.relevance.size else 0.0
        text = Text()
        for token, r in zip(display_tokens(row.tokens), row.relevance):
            red, green, blue = _rgb(float(r), scale)
            text.append(f" {token} ", style=f"black on rgb({red},{green},{blue})")
            text.append(" ")
        # tokens and labels are data, not markup: BERT's "[unused102]" must show as it is
        console.print(f"[bold]{escape(row.title)}[/bold]" + (f"  ({escape(row.explained)})" if row.explained else ""))
        console.print(text)
        values = "  ".join(f"{t}:{r:+.3f}" for t, r in zip(display_tokens(row.tokens), row.relevance))
        console.print(f"[dim]{escape(values)}[/dim]")
        console.print(escape(conservation_line(row, digits=4)) + "\n")


def conservation_line(row: TokenRow, digits: int) -> str:
    """Σ relevance (over every attributed input) against the explained value, shown with every explanation;
    the part not on the shown tokens (token-type ids, …) is named."""
    shown = float(np.sum(row.relevance, dtype=np.float64))
    total = shown if row.total is None else row.total
    line = f"Σ relevance = {total:+.{digits}f}"
    if round(total - shown, digits):
        line += f" (tokens {shown:+.{digits}f}, other inputs {total - shown:+.{digits}f})"
    if row.value is not None:
        line += f"  vs explained value {row.value:+.{digits}f}"
        if row.value != 0:
            line += f" (ratio {total / row.value:.3f})"
    return line


def html_report(rows: list[TokenRow], title: str, summary: str = "", images=(), layers=()) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no network): tokens coloured by relevance,
    exact values on hover, the explained target and value, and conservation per row.

    images: (caption, PNG bytes, Σ relevance, explained value) shown inline as data: URIs;
    layers: (caption, layer labels, tokens, matrix [layers, tokens]) shown as per-layer pictures."""
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
        parts.append(f"<p class='meta'>{html.escape(conservation_line(row, digits=5))}</p>")
        parts.append("<table><tr><th>token</th><th>relevance</th></tr>" + "".join(
            f"<tr><td>{html.escape(t)}</td><td>{float(r):+.6f}</td></tr>" for t, r in zip(row.tokens, row.relevance))
            + "</table></div>")
    import base64
    for caption, png, total, value in images:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<div class='row'><h2>{html.escape(caption)}</h2><img alt='relevance heatmap' "
                     f"style='image-rendering:pixelated;max-width:100%' src='data:image/png;base64,{data}'>"
                     f"<p class='meta'>{html.escape(_conservation(total, value))}</p></div>")
    for caption, labels, tokens, matrix in layers:
        data = base64.b64encode(layers_png_bytes(labels, tokens, matrix, caption)).decode("ascii")
        parts.append(f"<div class='row'><h2>relevance per layer: {html.escape(caption)}</h2>"
                     f"<img alt='relevance per layer' style='max-width:100%' src='data:image/png;base64,{data}'>"
                     "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def html_matrix(title: str, summary: str, row_labels: list[str], columns: list[str], matrix: np.ndarray,
                values: np.ndarray) -> str:
    """One self-contained HTML page (inline CSS, no scripts): a [rows, columns] relevance matrix as a table,
    each row coloured against its own max |R|, the exact value on hover; `values` is each row's explained
    value, shown with Σ of the row."""
    shown = display_tokens(columns)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;color:#222}.meta{color:#555;font-size:90%}"
             "table{border-collapse:collapse;font-family:monospace;font-size:85%}"
             "td{width:2.2em;height:1.6em;border:1px solid #eee}th{font-weight:normal;padding:2px 6px}"
             "th.col{writing-mode:vertical-rl;transform:rotate(180deg);vertical-align:bottom}"
             "th.row{text-align:right;white-space:nowrap}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>",
             "<p class='meta'>Red: relevance for the generated token; blue: against it; each row scaled "
             "separately. Hover a cell for its exact relevance.</p><table><tr><th></th>"]
    parts += [f"<th class='col'>{html.escape(t)}</th>" for t in shown]
    parts.append("<th class='row'>Σ R / logit</th></tr>")
    for label, row, value in zip(row_labels, np.asarray(matrix, np.float64), values):
        scale = float(np.abs(row).max()) if row.size else 0.0
        parts.append(f"<tr><th class='row'>{html.escape(label)}</th>")
        for token, r in zip(columns, row):
            red, green, blue = _rgb(float(r), scale)
            tip = html.escape(f"{label} ← {token}: {r:+.6f}", quote=True)
            parts.append(f"<td style='background:rgb({red},{green},{blue})' title='{tip}' "
                         f"data-relevance='{r:.8g}'></td>")
        parts.append(f"<th class='row'>{row.sum():+.4f} / {float(value):+.4f}</th></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def terminal_generation(prompt: str, generated: list[str], logits, sources: list[list[tuple[str, float]]],
                        console=None) -> None:
    """Each generated token with its top source tokens (coloured by relevance, largest |R| first)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text
    console = console or Console()
    console.print(f"[bold]{escape(prompt)}[/bold] → " + escape(" ".join(display_tokens(generated))))
    table = Table(title="each generated token and its most relevant source tokens", box=None, pad_edge=False)
    for column in ("#", "generated", "logit", "top sources (relevance)"):
        table.add_column(column)
    for i, (token, logit, top) in enumerate(zip(display_tokens(generated), logits, sources)):
        scale = max((abs(r) for _, r in top), default=0.0)
        text = Text()
        for source, r in top:
            red, green, blue = _rgb(r, scale)
            text.append(f" {display_tokens([source])[0]} {r:+.3f} ", style=f"black on rgb({red},{green},{blue})")
            text.append(" ")
        table.add_row(str(i), Text(token), f"{float(logit):+.3f}", text)
    console.print(table)


# ------------------------------------------------------------------------------------------------
# layers, images and PNGs (matplotlib with the Agg backend: no display needed)
# ------------------------------------------------------------------------------------------------

def _symmetric(values: np.ndarray) -> float:
    scale = float(np.abs(values).max()) if np.size(values) else 0.0
    return scale or 1.0


def terminal_layers(labels: list[str], tokens: list[str], matrix: np.ndarray, console=None) -> None:
    """Relevance per token per layer: one coloured row per layer, each row scaled to its own max |R|
    (the Σ column says how much relevance the layer holds)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    console = console or Console()
    shown = display_tokens(tokens)
    table = Table(title="relevance per layer (rows scaled separately)", show_lines=False, box=None, pad_edge=False)
    table.add_column("layer", style="bold")
    table.add_column("tokens")
    table.add_column("Σ", justify="right")
    for label, row in zip(labels, matrix):
        scale = float(np.abs(row).max()) if row.size else 0.0
        text = Text()
        for token, r in zip(shown, row):
            red, green, blue = _rgb(float(r), scale)
            text.append(f" {token} ", style=f"black on rgb({red},{green},{blue})")
        table.add_row(Text(label), text, f"{float(row.sum()):+.4f}")
    console.print(table)


def terminal_image(heat: np.ndarray, title: str, total: float, value: float | None, console=None,
                   width: int = 16) -> None:
    """A coarse block picture of an image relevance map (two terminal cells per block)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text
    console = console or Console()
    h, w = heat.shape
    step = max(1, int(np.ceil(max(h, w) / width)))
    hb, wb = h // step, w // step
    blocks = heat[:hb * step, :wb * step].reshape(hb, step, wb, step).sum(axis=(1, 3))
    scale = float(np.abs(blocks).max()) if blocks.size else 0.0
    console.print(f"[bold]{escape(title)}[/bold]")
    for row in blocks:
        text = Text()
        for r in row:
            red, green, blue = _rgb(float(r), scale)
            text.append("  ", style=f"on rgb({red},{green},{blue})")
        console.print(text)
    console.print(_conservation(total, value) + "\n")


def _conservation(total: float, value: float | None) -> str:
    line = f"Σ relevance = {total:+.4f}"
    if value is not None:
        line += f"  vs explained value {value:+.4f}"
        if value != 0:
            line += f" (ratio {total / value:.3f})"
    return line


def _figure():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def layers_png_bytes(labels: list[str], tokens: list[str], matrix: np.ndarray, title: str = "") -> bytes:
    """Relevance per token (columns) per layer (rows) as a PNG; diverging colours centred at zero, each
    row normalised by its own max |R| so deep and shallow layers are both readable."""
    import io
    plt = _figure()
    matrix = np.asarray(matrix, np.float64)
    norm = matrix / np.maximum(np.abs(matrix).max(axis=1, keepdims=True), 1e-30)
    shown = display_tokens(tokens)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(shown) + 2.5), max(2.0, 0.42 * len(labels) + 1.4)), dpi=100)
    ax.imshow(norm, cmap="bwr", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), [f"{lab}  (Σ {s:+.2f})" for lab, s in zip(labels, matrix.sum(axis=1))],
                  fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def save_layers_png(path, labels: list[str], tokens: list[str], matrix: np.ndarray, title: str = "", *,
                    force: bool = False, inputs=()):
    """`layers_png_bytes` written through lrpc.safeio (never over an existing file without force)."""
    from lrpc import safeio
    return safeio.write_bytes(path, layers_png_bytes(labels, tokens, matrix, title), force=force, inputs=inputs)


def image_overlay(heat: np.ndarray, picture: np.ndarray | None, scale: int = 1) -> np.ndarray:
    """H×W×3 uint8: the relevance map (bwr, centred at zero, opacity growing with |R|) over the
    greyscale picture. The result has the picture's size, or the map's size × scale without one."""
    from PIL import Image
    import matplotlib
    heat = np.asarray(heat, np.float32)
    if picture is not None:
        size = (picture.shape[1], picture.shape[0])
    else:
        size = (heat.shape[1] * scale, heat.shape[0] * scale)
    resized = np.asarray(Image.fromarray(heat, mode="F").resize(size, Image.BILINEAR), np.float32)
    t = np.clip(resized / _symmetric(heat), -1, 1)
    colours = matplotlib.colormaps["bwr"]((t + 1) / 2)[..., :3]
    if picture is None:
        return (colours * 255).round().astype(np.uint8)
    grey = np.asarray(Image.fromarray(picture.astype(np.uint8)).convert("L"), np.float32)[..., None] / 255.0
    alpha = np.minimum(1.0, 1.5 * np.abs(t))[..., None] * 0.8
    out = (1 - alpha) * (0.25 + 0.75 * grey) + alpha * colours
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def save_image_overlay(path, heat: np.ndarray, picture: np.ndarray | None, scale: int = 1, title: str = "", *,
                       force: bool = False, inputs=()):
    """Write the overlay as a PNG exactly the picture's size (pixels, no axes or margins)."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from lrpc import safeio
    info = PngInfo()
    if title:
        info.add_text("Description", f"lrpc relevance: {title}")
    buffer = io.BytesIO()
    Image.fromarray(image_overlay(heat, picture, scale)).save(buffer, format="PNG", pnginfo=info)
    return safeio.write_bytes(path, buffer.getvalue(), force=force, inputs=inputs)


def image_overlay_png(heat: np.ndarray, picture: np.ndarray | None, scale: int = 4) -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image_overlay(heat, picture, scale if picture is None else 1)).save(buffer, format="PNG")
    return buffer.getvalue()
