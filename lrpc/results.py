"""What `lrpc explain` and `lrpc.Attributor` return: one `Attribution` per explained input and target,
`Attributions` for several, with their pictures (terminal, HTML, PNG) and JSON form."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrpc.errors import LrpcError


@dataclass
class Attribution:
    """One explained input and target.

    relevance: relevance of the main attributed input for this input alone (padding removed): one
        value per token for token ids, the input's shape (without batch) for float inputs (images:
        [channels, height, width]).
    tokens: the tokens (None when unknown). target: the explained class / token index (None for a seed
        vector: an embedding's similarity to another); target_label says it in words (with the contrast,
        if any). logit: the explained value s (y_A − y_B for a contrast). latent: per-layer relevance per
        token ({layer label: [tokens]}) with `layers`.
    index: which input of the call this explains (0-based, in a batch file among its non-blank lines; top-k
        rows of one input share it); line: its 1-based line number in a batch file
        (`Attributor.attribute_file`), else None. token_ids: the token ids; offsets: each token's
        [start, end) characters in the input text ((0, 0) for added special tokens), to map relevance
        back to the text (None where unknown: arrays, images).
    """

    relevance: np.ndarray
    tokens: list[str] | None
    target: int | None
    logit: float
    target_label: str = ""
    contrast: int | None = None
    position: int | None = None
    input_name: str = ""
    relevances: dict[str, np.ndarray] = field(default_factory=dict)   # every attributed input
    latent: dict[str, np.ndarray] = field(default_factory=dict)       # layer label → relevance per token
    image: np.ndarray | None = field(default=None, repr=False)          # the picture shown (H×W×3 uint8)
    title: str = ""
    model: str = ""
    index: int = 0
    line: int | None = None
    token_ids: list[int] | None = None
    offsets: list[tuple[int, int]] | None = None

    @property
    def conservation(self) -> float:
        """Σ relevance over every attributed input, to compare with `logit`."""
        return float(sum(float(np.sum(r, dtype=np.float64)) for r in self.relevances.values()))

    def explained(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        kind = "logit" if self.target is not None else "value"   # no class: a seed vector's ⟨seed, y⟩ (a similarity)
        return f"{self.target_label or self.target}{where}: {kind} {self.logit:+.4f}"

    def token_row(self):
        from lrpc import viz
        tokens = self.tokens if self.tokens is not None else [str(i) for i in range(self.relevance.size)]
        return viz.TokenRow(self.title or "input", list(tokens), np.asarray(self.relevance).reshape(-1),
                            self.explained(), self.logit, self.conservation)

    # ---- pictures ------------------------------------------------------------------------------
    def show(self, console=None) -> None:
        """Terminal heatmap (diverging colours centred at zero) with the conservation line."""
        from lrpc import viz
        if self.is_image:
            viz.terminal_image(self.image_heat(), f"{self.title or 'image'}  ({self.explained()})",
                               self.conservation, self.logit, console)
        else:
            viz.terminal([self.token_row()], console)
        if self.latent:
            labels, matrix = self.layer_matrix()
            viz.terminal_layers(labels, self._tokens(), matrix, console)

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None, *, force: bool = False,
                inputs=()) -> str:
        return Attributions([self]).to_html(path, title, force=force, inputs=inputs)

    def save_png(self, path: str | os.PathLike, scale: int = 1, *, force: bool = False, inputs=()) -> Path:
        """Images: the relevance heatmap overlaid on the picture (its original size, or the model's
        input size × scale). Token inputs: the per-layer picture with `layers`, else a one-row heatmap.
        Written through lrpc.safeio: never over an existing file without force, never over an input."""
        from lrpc import viz
        if self.is_image:
            return viz.save_image_overlay(path, self.image_heat(), self.image, scale=scale, title=self.explained(),
                                          force=force, inputs=inputs)
        if self.latent:
            return self.save_layers_png(path, force=force, inputs=inputs)
        return viz.save_layers_png(path, ["input"], self._tokens(), np.asarray(self.relevance).reshape(1, -1),
                                   title=self.explained(), force=force, inputs=inputs)

    def save_layers_png(self, path: str | os.PathLike, *, force: bool = False, inputs=()) -> Path:
        from lrpc import viz
        if not self.latent:
            raise LrpcError("no per-layer relevance: explain with layers=True (CLI: --layers) or an explainer "
                            "compiled with --latent")
        labels, matrix = self.layer_matrix()
        return viz.save_layers_png(path, labels, self._tokens(), matrix, title=self.explained(), force=force,
                                   inputs=inputs)

    def layer_matrix(self) -> tuple[list[str], np.ndarray]:
        """(labels, [layers, tokens]): the latent rows, then the input's (unless the embeddings row is it)."""
        labels, rows = list(self.latent), list(self.latent.values())
        if "embeddings" not in self.latent:
            labels.append("input")
            rows.append(np.asarray(self.relevance).reshape(-1))
        return labels, np.stack(rows)

    @property
    def is_image(self) -> bool:
        return self.tokens is None and np.ndim(self.relevance) == 3

    def image_heat(self) -> np.ndarray:
        """Relevance per pixel: summed over the channel axis."""
        return np.asarray(self.relevance, np.float64).sum(axis=0)

    def _tokens(self) -> list[str]:
        n = next(iter(self.latent.values())).size if self.latent else np.size(self.relevance)
        return list(self.tokens) if self.tokens is not None else [str(i) for i in range(n)]

    def to_json(self) -> str:
        """JSON text of `to_dict()` (`lrpc.load_results` reads it back)."""
        return json_text(self.to_dict())

    def _repr_html_(self) -> str:   # Jupyter shows the HTML report inline
        return self.to_html()

    def to_dict(self) -> dict:
        out = {"model": self.model, "title": self.title, "target": self.target, "target_label": self.target_label,
               "contrast": self.contrast, "position": self.position, "logit": self.logit,
               "conservation": {"relevance_sum": self.conservation, "explained_value": self.logit},
               "input": self.input_name, "index": self.index, "line": self.line, "tokens": self.tokens,
               "token_ids": self.token_ids, "offsets": None if self.offsets is None else [list(o) for o in self.offsets],
               "relevance": np.asarray(self.relevance).tolist()}
        if len(self.relevances) > 1:   # several attributed inputs (an encoder–decoder's source and target)
            out["relevances"] = {k: np.asarray(v).tolist() for k, v in self.relevances.items()}
        if self.latent:
            out["layers"] = {k: v.tolist() for k, v in self.latent.items()}
        return out


@dataclass
class LineError:
    """A line of a batch file that could not be explained, and why (one line, starting "line N:")."""
    line: int
    message: str

    def to_dict(self) -> dict:
        return {"line": self.line, "error": self.message}


class Attributions(list):
    """Several explanations (a batch, or the top-k of one input): a list with the same pictures.
    `errors`: the lines of a batch file that could not be explained (`Attributor.attribute_file`)."""

    def __init__(self, items=(), errors=()):
        super().__init__(items)
        self.errors: list[LineError] = list(errors)

    def show(self, console=None) -> None:
        for a in self:
            a.show(console)

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None, *, force: bool = False,
                inputs=()) -> str:
        """The self-contained HTML report; with `path`, also written there through lrpc.safeio."""
        from lrpc import safeio, viz
        rows, images, layers = [], [], []
        for a in self:
            if a.is_image:
                images.append((f"{a.title or 'image'}: {a.explained()}", viz.image_overlay_png(a.image_heat(), a.image),
                               a.conservation, a.logit))
            else:
                rows.append(a.token_row())
            if a.latent:
                labels, matrix = a.layer_matrix()
                layers.append((f"{a.title}: {a.explained()}", labels, a._tokens(), matrix))
        model = self[0].model if self else ""
        text = viz.html_report(rows, title or f"lrpc: relevance ({model})",
                               f"AttnLRP relevance computed by an lrpc explainer of {model}." if model else "",
                               images=images, layers=layers)
        if path is not None:
            safeio.write_text(path, text, force=force, inputs=inputs)
        return text

    def to_dicts(self) -> list[dict]:
        """One dict per explanation and per error ({"line": N, "error": "line N: …"}), in line order."""
        rows = [a.to_dict() for a in self] + [e.to_dict() for e in self.errors]
        return sorted(rows, key=lambda row: row["line"] or 0) if self.errors else rows

    def to_json(self) -> str:
        """JSON text: the list `to_dicts()` (`lrpc.load_results` reads it back)."""
        return json_text(self.to_dicts())

    def _repr_html_(self) -> str:   # Jupyter shows the HTML report inline
        return self.to_html()


@dataclass
class Generation:
    """A greedily generated answer and its attribution matrix (`Attributor.generate`, `lrpc explain
    --generate N`), computed in one run of a K explainer.

    matrix: [generated, prompt + generated] relevance; row i explains generated token i (its logit at the
        position before it) over every token of the sequence; entries right of that position are exactly 0
        (a causal model cannot look ahead). source_tokens: the prompt's tokens, then the generated ones.
        An encoder–decoder model: [generated, source + decoder start + generated], the prompt being the
        source and the decoder's start token the first of the answer prefix.
    generated_tokens / generated_ids: the answer. prompt_length: where the answer starts in source_tokens.
    logits: the explained logit of each generated token (each row of the matrix sums to about it).
    """

    matrix: np.ndarray
    source_tokens: list[str]
    generated_tokens: list[str]
    generated_ids: list[int]
    prompt_length: int
    logits: np.ndarray
    prompt: str = ""
    model: str = ""

    def top_sources(self, row: int, k: int = 5) -> list[tuple[str, float]]:
        """The k source tokens with the largest |relevance| for generated token `row`, largest first."""
        values = self.matrix[row]
        order = np.argsort(-np.abs(values), kind="stable")[:k]
        return [(self.source_tokens[j], float(values[j])) for j in order if values[j] != 0]

    def _labels(self) -> list[str]:
        return [f"{i}: {t}" for i, t in enumerate(self.generated_tokens)]

    def show(self, console=None) -> None:
        """Terminal: the answer, then each generated token with its top source tokens."""
        from lrpc import viz
        viz.terminal_generation(self.prompt, self.generated_tokens, self.logits,
                                [self.top_sources(i) for i in range(len(self.generated_tokens))], console)

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None, *, force: bool = False,
                inputs=()) -> str:
        """Self-contained HTML: the matrix as a heatmap (generated tokens down, source tokens across, each
        row scaled to its own max |R|, exact values on hover); with `path`, written through lrpc.safeio."""
        from lrpc import safeio, viz
        text = viz.html_matrix(title or f"lrpc: generation attribution ({self.model})",
                               f"Prompt: {self.prompt!r}. Row i: the relevance of every token for generated token "
                               "i (AttnLRP, one explainer run for all rows).",
                               self._labels(), self.source_tokens, self.matrix, self.logits)
        if path is not None:
            safeio.write_text(path, text, force=force, inputs=inputs)
        return text

    def save_png(self, path: str | os.PathLike, *, force: bool = False, inputs=()) -> Path:
        """The matrix as a PNG (rows scaled separately), through lrpc.safeio."""
        from lrpc import viz
        return viz.save_layers_png(path, self._labels(), self.source_tokens, self.matrix,
                                   title=f"generation attribution: {self.prompt}", force=force, inputs=inputs)

    def to_dict(self) -> dict:
        return {"model": self.model, "prompt": self.prompt, "generated_tokens": self.generated_tokens,
                "generated_ids": [int(i) for i in self.generated_ids], "source_tokens": self.source_tokens,
                "prompt_length": self.prompt_length, "logits": np.asarray(self.logits).tolist(),
                "matrix": np.asarray(self.matrix).tolist()}

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def _repr_html_(self) -> str:   # Jupyter shows the HTML report inline
        return self.to_html()


def json_text(doc) -> str:
    """JSON with non-finite numbers as strings ("nan", "inf"): valid JSON for every reader."""
    import json

    def finite(value):
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(doc))


def _relevances(doc: dict) -> dict[str, np.ndarray]:
    """The main input's relevance, and the other attributed inputs' share (token-type ids, …) as one value,
    so `conservation` read back is the `relevance_sum` that was written; every input's own when the
    document has them ("relevances")."""
    if isinstance(doc.get("relevances"), dict):
        return {k: np.asarray(v, np.float32) for k, v in doc["relevances"].items()}
    relevance = np.asarray(doc["relevance"], np.float32)
    out = {doc.get("input") or "input": relevance}
    total = (doc.get("conservation") or {}).get("relevance_sum")
    if isinstance(total, (int, float)):
        out["other inputs"] = np.array([total - float(np.sum(relevance, dtype=np.float64))])
    return out


def load_results(path: str | os.PathLike) -> Attributions:
    """Read what `to_json()` (or `lrpc explain --json`, one object or JSON lines) wrote back into
    `Attributions` (relevance, tokens, target, logit and layers; pictures need the model again)."""
    import json
    text = Path(path).read_text(encoding="utf-8")
    try:
        docs = json.loads(text)
    except json.JSONDecodeError:
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise LrpcError(f"{path} is not lrpc results JSON: {exc}") from None
    docs = docs if isinstance(docs, list) else [docs]
    errors = [LineError(d["line"], d["error"]) for d in docs if isinstance(d, dict) and d.get("error")]
    docs = [d for d in docs if not (isinstance(d, dict) and d.get("error"))]
    try:
        return Attributions((Attribution(
            relevance=np.asarray(d["relevance"], np.float32), tokens=d.get("tokens"), target=d["target"],
            logit=float(d["logit"]), target_label=d.get("target_label") or "", contrast=d.get("contrast"),
            position=d.get("position"), input_name=d.get("input") or "", title=d.get("title") or "",
            model=d.get("model") or "", relevances=_relevances(d),
            latent={k: np.asarray(v, np.float32) for k, v in (d.get("layers") or {}).items()}, index=d.get("index") or 0,
            line=d.get("line"), token_ids=d.get("token_ids"),
            offsets=None if d.get("offsets") is None else [tuple(o) for o in d["offsets"]]) for d in docs), errors)
    except (KeyError, TypeError) as exc:
        raise LrpcError(f"{path} is not lrpc results JSON (missing {exc})") from None
