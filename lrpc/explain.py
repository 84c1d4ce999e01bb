"""Explanations people can use: the Python side of `lrpc explain`.

    import lrpc
    lrp = lrpc.Attributor("llama")                       # a zoo name, HF folder, ONNX model or explainer
    result = lrp.attribute("the cat sat on the", target="mat")   # Captum's attribute(inputs, target=...)
    result.relevance, result.tokens, result.target, result.logit
    result.show(); result.to_html("report.html")
    lrpc.explain("hf-vit", image="cat.png").save_png("cat-lrp.png")

Models are compiled on the way with a *vector* seed (input `lrp_seed`), so one explainer serves every
target kind: the predicted class or next token, a class index / label / token string, the top-k
classes (one padded batch, the input repeated k times with k one-hot seeds), a sequence position and a
contrastive target A − B (seed e_A − e_B). Compiled explainers are cached under $LRPC_CACHE or
~/.cache/lrpc, keyed by a hash of the model, the options and `lrpc.demo.compiler_fingerprint()`.

Inputs of different lengths run as one right-padded batch through the attention mask; each row is
the input explained alone, and padding gets exactly zero relevance.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from lrpc import contract
from lrpc.errors import LrpcError
from lrpc.runtime import Explainer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# A word-level toy tokenizer for the tiny random-weight zoo models (vocabulary 128, ids 0/1/2 are
# pad/bos/eos as in the zoo configs), so `lrpc explain llama --text "…"` shows readable tokens.
TOY_WORDS = ("the a an of to in on at by for with from and or but not no is are was were be been has have "
             "had do does did will would can could should may might must i you he she it we they me him her "
             "us them my your his its our their this that these those what which who where when why how all "
             "some any each every one two three many much more most other so "
             "just now then here there up down out over under cat dog sat mat sun moon good bad "
             "great movie film book love hate happy sad big small red blue green day night house tree water "
             "fire city man woman . , ! ?").split()


# ------------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------------

@dataclass
class Attribution:
    """One explained input and target.

    relevance: relevance of the main attributed input for this input alone (padding removed): one
        value per token for token ids, the input's shape (without batch) for float inputs (images:
        [channels, height, width]).
    tokens: the tokens (None when unknown). target: the explained class / token index; target_label
        says it in words (with the contrast, if any). logit: the explained value s (y_A − y_B for a
        contrast). latent: per-layer relevance per token ({layer label: [tokens]}) with `layers`.
    """

    relevance: np.ndarray
    tokens: list[str] | None
    target: int
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

    @property
    def conservation(self) -> float:
        """Σ relevance over every attributed input, to compare with `logit`."""
        return float(sum(float(np.sum(r, dtype=np.float64)) for r in self.relevances.values()))

    def explained(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        return f"{self.target_label or self.target}{where}: logit {self.logit:+.4f}"

    def token_row(self):
        from lrpc import viz
        tokens = self.tokens if self.tokens is not None else [str(i) for i in range(self.relevance.size)]
        return viz.TokenRow(self.title or "input", list(tokens), np.asarray(self.relevance).reshape(-1),
                            self.explained(), self.logit)

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

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None) -> str:
        return Attributions([self]).to_html(path, title)

    def save_png(self, path: str | os.PathLike, scale: int = 1) -> Path:
        """Images: the relevance heatmap overlaid on the picture (its original size, or the model's
        input size × scale). Token inputs: the per-layer picture with `layers`, else a one-row heatmap."""
        from lrpc import viz
        if self.is_image:
            return viz.save_image_overlay(path, self.image_heat(), self.image, scale=scale, title=self.explained())
        if self.latent:
            return self.save_layers_png(path)
        return viz.save_layers_png(path, ["input"], self._tokens(), np.asarray(self.relevance).reshape(1, -1),
                                   title=self.explained())

    def save_layers_png(self, path: str | os.PathLike) -> Path:
        from lrpc import viz
        if not self.latent:
            raise LrpcError("no per-layer relevance: explain with layers=True (CLI: --layers) or an explainer "
                            "compiled with --latent")
        labels, matrix = self.layer_matrix()
        return viz.save_layers_png(path, labels, self._tokens(), matrix, title=self.explained())

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

    def to_dict(self) -> dict:
        out = {"model": self.model, "title": self.title, "target": self.target, "target_label": self.target_label,
               "contrast": self.contrast, "position": self.position, "logit": self.logit,
               "conservation": {"relevance_sum": self.conservation, "explained_value": self.logit},
               "input": self.input_name, "tokens": self.tokens,
               "relevance": np.asarray(self.relevance).tolist()}
        if self.latent:
            out["layers"] = {k: v.tolist() for k, v in self.latent.items()}
        return out


class Attributions(list):
    """Several explanations (a batch, or the top-k of one input): a list with the same pictures."""

    def show(self, console=None) -> None:
        for a in self:
            a.show(console)

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None) -> str:
        from lrpc import viz
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
            _write_atomic(Path(path), text)
        return text

    def to_json(self) -> list[dict]:
        return [a.to_dict() for a in self]


# ------------------------------------------------------------------------------------------------
# tokenizers and images
# ------------------------------------------------------------------------------------------------

class Tokenizer:
    """A `tokenizers.Tokenizer` with what lrpc needs: encode with special tokens, token ↔ id, pad id."""

    def __init__(self, backend, pad_id: int | None = None):
        self.backend = backend
        if pad_id is None:
            padding = getattr(backend, "padding", None)
            pad_id = padding.get("pad_id") if padding else None
            for name in ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"):
                if pad_id is None and backend.token_to_id(name) is not None:
                    pad_id = backend.token_to_id(name)
        self.pad_id = int(pad_id or 0)
        self.backend.no_padding()
        self.backend.no_truncation()

    @classmethod
    def load(cls, where: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as Backend
        path = Path(where)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LrpcError(f"no tokenizer.json in {where}: pass --tokenizer DIR (a folder with tokenizer.json)")
        pad = None
        config = file.parent / "config.json"
        if config.is_file():
            pad = json.loads(config.read_text()).get("pad_token_id")
        return cls(Backend.from_file(str(file)), pad)

    @classmethod
    def toy(cls) -> Tokenizer:
        """Word-level, 128 ids: [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3 and 124 English words (zoo models)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import models as tm
        from tokenizers import normalizers, pre_tokenizers
        punctuation = [".", ",", "!", "?"]
        words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *punctuation, *[w for w in TOY_WORDS if w not in punctuation]]
        vocab = {w: i for i, w in enumerate(words[:128])}
        backend = Backend(tm.WordLevel(vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(backend, 0)

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        enc = self.backend.encode(text)
        return list(enc.ids), list(enc.tokens)

    def token_id(self, token: str) -> int:
        for candidate in (token, "Ġ" + token.lstrip(), "▁" + token.lstrip()):
            found = self.backend.token_to_id(candidate)
            if found is not None:
                return int(found)
        ids = self.backend.encode(token, add_special_tokens=False).ids
        if len(ids) == 1:
            return int(ids[0])
        raise LrpcError(f"target {token!r} is {len(ids)} tokens for this tokenizer, not one: give one token "
                        "or its id")

    def token(self, index: int) -> str:
        return self.backend.id_to_token(int(index)) or str(index)


def load_image(source, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [1, 3, H, W] float32, the picture as H0×W0×3 uint8). The image is converted to RGB,
    resized (bicubic) to the model's H×W, scaled to [0, 1] and normalised per channel: (x − mean) / std,
    ImageNet statistics by default (a Hugging Face folder's preprocessor_config.json overrides them)."""
    from PIL import Image
    if isinstance(source, np.ndarray):
        picture = Image.fromarray(source.astype(np.uint8)).convert("RGB")
    elif isinstance(source, Image.Image):
        picture = source.convert("RGB")
    else:
        try:
            picture = Image.open(source).convert("RGB")
        except (OSError, ValueError) as exc:
            raise LrpcError(f"cannot read the image {source}: {exc}") from None
    original = np.asarray(picture, np.uint8)
    resized = np.asarray(picture.resize((size[1], size[0]), Image.BICUBIC), np.float32) / 255.0
    x = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32), original


# ------------------------------------------------------------------------------------------------
# compiling on the way, cached
# ------------------------------------------------------------------------------------------------

def _hash_file(digest, path: Path) -> None:
    digest.update(path.name.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def _model_hash(model) -> tuple[str, str]:
    """(a content hash, a short name) for any model source lrpc accepts."""
    digest = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        digest.update(model.SerializeToString())
        return digest.hexdigest()[:16], "model"
    path = Path(model)
    if path.is_file():
        _hash_file(digest, path)
        proto = onnx.load_model(str(path), load_external_data=False)
        locations = {e.value for t in onnx.external_data_helper._get_all_tensors(proto)
                     if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
        for location in sorted(locations):
            if (path.parent / location).is_file():
                _hash_file(digest, path.parent / location)
        return digest.hexdigest()[:16], path.stem
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            _hash_file(digest, file)
        return digest.hexdigest()[:16], path.name
    from lrpc import models
    if str(model) in models.names():
        for source in sorted(Path(models.__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
        digest.update(str(model).encode())
        return digest.hexdigest()[:16], str(model)
    raise LrpcError(f"{model} is not an ONNX file, an explainer, a Hugging Face folder or a zoo model "
                    "(`lrpc zoo` lists them)")


def is_explainer(model) -> bool:
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.is_file():
            return False
        from lrpc.loading import read_proto
        proto = read_proto(path)
    return contract.read_metadata({p.key: p.value for p in proto.metadata_props}) is not None


def _onnx_source(model, task: str | None):
    """An ONNX path or proto for a model source (HF folders and zoo names are exported)."""
    if isinstance(model, onnx.ModelProto) or Path(model).is_file():
        return model
    from lrpc.frontend import export_hf
    return export_hf(model, task=task)


def residual_stream(model) -> list[tuple[str, str]]:
    """(tensor name, label) of each layer's residual stream, in graph order: the attribution point (the
    embedding output, or the float input) and the output of every Add whose two operands carry relevance
    and have the same shape [batch, seq, hidden] (the residual connections)."""
    from lrpc.compiler import analyse_and_plan, load
    ir_model = load(model)
    attributions, carrying, _ = analyse_and_plan(ir_model, "attnlrp")
    points = [p for a in attributions for p in a.points if a.kind == "token"]
    hidden = {p.shape[-1] for p in points if p.shape is not None and p.shape.rank() == 3}
    found = [(p.name, "embeddings") for p in points]
    counts: dict[str, int] = {}
    for node in ir_model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or not all(i in carrying for i in node.inputs):
            continue
        out = node.outputs[0]
        shapes = [v.shape for v in (*node.inputs, out)]
        if any(s is None or s.rank() != 3 for s in shapes) or len({str(s) for s in shapes}) != 1:
            continue
        if hidden and out.shape[-1] not in hidden:
            continue
        scope = _scope(node)
        counts[scope] = counts.get(scope, 0) + 1
        found.append((out.name, scope))
    seen: dict[str, int] = {}
    labels = []
    for name, scope in found:   # a layer's residual adds: "layers.0 +1" (after attention), "layers.0 +2"
        seen[scope] = seen.get(scope, 0) + 1
        labels.append((name, f"{scope} +{seen[scope]}" if counts.get(scope, 1) > 1 else scope))
    return labels


def _scope(node) -> str:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    try:
        scopes = [s for s in (ast.literal_eval(raw) if raw else []) if s]
    except (ValueError, SyntaxError):
        scopes = []
    modules = scopes[:-1] if len(scopes) > 1 else scopes
    if not modules:
        return node.outputs[0].name
    label = modules[-1]
    for prefix in ("hf_model.model.", "hf_model.", "model.", "vit.", "transformer."):
        if label.startswith(prefix):
            label = label[len(prefix):]
    return label


def compiled_explainer(model, *, preset: str = "attnlrp", seed: str = "vector", latent: str | None = None,
                       layers: bool = False, task: str | None = None, output_name: str | None = None,
                       cache: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """Path of the explainer of `model` (compiled now or found in the cache) and its sidecar info
    ({"layers": [[tensor, label], ...]})."""
    import lrpc
    from lrpc.demo import cache_dir, compiler_fingerprint
    model_key, stem = _model_hash(model)
    options = json.dumps({"preset": preset, "seed": seed, "latent": latent, "layers": layers, "task": task,
                          "output": output_name, "compiler": compiler_fingerprint()}, sort_keys=True)
    key = hashlib.sha256((model_key + options).encode()).hexdigest()[:16]
    folder = cache_dir(cache)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{preset}-{key}.onnx"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        return path, json.loads(sidecar.read_text())
    source = _onnx_source(model, task)
    info: dict[str, Any] = {"source": str(model) if not isinstance(model, onnx.ModelProto) else "model"}
    pattern = latent
    if layers and latent is None:
        found = residual_stream(source)
        info["layers"] = [list(x) for x in found]
        pattern = "^(" + "|".join(re.escape(n) for n, _ in found) + ")$" if found else None
    elif latent:
        info["layers"] = None
    lrpc.compile(source, preset=preset, seed=seed, latent=pattern, output=path, output_name=output_name,
                 force=True)
    _write_atomic(sidecar, json.dumps(info))
    return path, info


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# the attributor
# ------------------------------------------------------------------------------------------------

@dataclass
class _Item:
    inputs: dict[str, np.ndarray]            # one input, batch axis of size 1, unpadded
    tokens: list[str] | None = None
    image: np.ndarray | None = None
    title: str = ""


class Attributor:
    """Captum-style: `Attributor(model).attribute(inputs, target=...)`.

    model: a zoo name, a Hugging Face folder, an ONNX file or proto (compiled on the way with a vector
    seed, cached), an explainer file, or an `lrpc.Explainer`. tokenizer: a folder / tokenizer.json (default:
    the model folder's, or the toy word tokenizer for the tiny zoo models). layers=True adds the relevance
    of each layer's residual stream (`latent=REGEX` picks other tensors).
    """

    def __init__(self, model, *, tokenizer=None, preset: str = "attnlrp", layers: bool = False,
                 latent: str | None = None, task: str | None = None, output_name: str | None = None,
                 cache: str | os.PathLike | None = None, providers: list[str] | None = None,
                 threads: int | None = None, session_config: dict[str, str] | None = None, image_mean=None,
                 image_std=None):
        self.name = model if isinstance(model, str) else getattr(model, "name", "model")
        self.layer_labels: dict[str, str] = {}
        if isinstance(model, Explainer):
            self.explainer = model
        elif is_explainer(model):
            if layers and latent is None and not contract.read_metadata(_metadata(model)).get("latent"):
                raise LrpcError("this explainer has no latent outputs: compile it with --latent REGEX, or give "
                                "the original model")
            self.explainer = Explainer(model, providers, threads, session_config=session_config)
        else:
            path, info = compiled_explainer(model, preset=preset, latent=latent, layers=layers, task=task,
                                            output_name=output_name, cache=cache)
            self.layer_labels = dict(info.get("layers") or [])
            self.explainer = Explainer(path, providers, threads, session_config=session_config)
        if isinstance(model, (str, os.PathLike)) and not isinstance(model, Explainer):
            self.name = Path(model).name if Path(model).exists() else str(model)
        self.meta = self.explainer.meta
        self.vector = self.meta["seed"] == "vector"
        self.rank = self.meta["rank"]
        self.attributed = dict(self.meta["attributed"])
        self.main_input = next(iter(self.attributed))
        self.latent_names = list(self.meta.get("latent", []))
        self.config = self._config(model)
        self.tokenizer = self._tokenizer(model, tokenizer)
        self.mask_name = next((n for n in self.explainer.model_inputs if "mask" in n.lower()), None)
        self.image_mean = image_mean or self.config.get("image_mean") or IMAGENET_MEAN
        self.image_std = image_std or self.config.get("image_std") or IMAGENET_STD

    # ---- setup helpers -------------------------------------------------------------------------
    @staticmethod
    def _config(model) -> dict:
        config: dict = {}
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            folder = path if path.is_dir() else path.parent
            for name in ("config.json", "preprocessor_config.json"):
                if (path.is_dir() or path.is_file()) and (folder / name).is_file():
                    try:
                        config.update(json.loads((folder / name).read_text()))
                    except ValueError:
                        pass
        return config

    def _tokenizer(self, model, tokenizer) -> Tokenizer | None:
        if isinstance(tokenizer, Tokenizer):
            return tokenizer
        if isinstance(tokenizer, str) and tokenizer == "toy":
            return Tokenizer.toy()
        if tokenizer is not None:
            if hasattr(tokenizer, "encode") and hasattr(tokenizer, "token_to_id"):
                return Tokenizer(tokenizer)
            return Tokenizer.load(tokenizer)
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            folder = path if path.is_dir() else path.parent
            if (path.is_dir() or path.is_file()) and (folder / "tokenizer.json").is_file():
                return Tokenizer.load(folder)
            from lrpc import models
            if str(model) in ("minilm", "minilm-sentence"):
                return Tokenizer.load(models.minilm_dir())
            if str(model) in models.names() and "input_ids" in self.attributed:
                return Tokenizer.toy()
        return None

    # ---- inputs --------------------------------------------------------------------------------
    def _items(self, inputs, image=None) -> list[_Item]:
        if image is not None:
            images = image if isinstance(image, (list, tuple)) else [image]
            return [self._image_item(i) for i in images]
        if isinstance(inputs, (str, Path)) and Path(inputs).suffix.lower() in IMAGE_SUFFIXES and Path(inputs).is_file():
            return [self._image_item(inputs)]
        if isinstance(inputs, str):
            return [self._text_item(inputs)]
        if isinstance(inputs, dict):
            arrays = {k: np.asarray(v) for k, v in inputs.items()}
            batch = next(iter(arrays.values())).shape[0] if arrays else 0
            if batch and all(a.ndim >= 1 and a.shape[0] == batch for a in arrays.values()):
                return [self._array_item({k: a[i:i + 1] for k, a in arrays.items()}) for i in range(batch)]
            return [self._array_item(arrays)]
        if isinstance(inputs, (list, tuple)):
            items: list[_Item] = []
            for x in inputs:
                items.extend(self._items(x))
            return items
        if type(inputs).__module__.startswith("PIL"):
            return [self._image_item(inputs)]
        raise LrpcError(f"cannot explain a {type(inputs).__name__}: give text, a dict of arrays, an image, or a "
                        "list of them")

    def _text_item(self, text: str) -> _Item:
        if self.tokenizer is None:
            raise LrpcError("text input needs a tokenizer: pass --tokenizer DIR (a folder with tokenizer.json)")
        if not text.strip():
            raise LrpcError("empty text: give at least one word")
        ids, tokens = self.tokenizer.encode(text)
        spec = self.explainer.inputs.get("input_ids")
        if spec is None:
            raise LrpcError(f"this model takes {', '.join(self.explainer.model_inputs)}, not input_ids: use --input")
        vocab = self.config.get("vocab_size") or self.config.get("n_vocab")
        if vocab and max(ids) >= vocab:
            raise LrpcError(f"the tokenizer gives id {max(ids)} but the model's vocabulary has {vocab} entries: "
                            "pass the model's own tokenizer with --tokenizer")
        arrays = {"input_ids": np.array([ids], np.int64)}
        for name in self.explainer.model_inputs:
            if name == "input_ids":
                continue
            if name == self.mask_name:
                arrays[name] = np.ones((1, len(ids)), np.int64)
            elif name in ("token_type_ids", "position_ids"):
                arrays[name] = (np.zeros if name == "token_type_ids" else _arange)((1, len(ids)), np.int64)
            else:
                raise LrpcError(f"the model also takes '{name}', which text alone does not give: use --input")
        return _Item(arrays, tokens, title=text)

    def _image_item(self, source) -> _Item:
        name = self.main_input
        spec = self.explainer.inputs[name]
        if len(spec.shape) != 4 or not all(isinstance(d, int) for d in spec.shape[2:]):
            raise LrpcError(f"input '{name}' is shaped {spec.shape}, not [batch, channels, H, W] with a fixed "
                            "size: images need a vision model")
        pixels, picture = load_image(source, tuple(spec.shape[2:]), self.image_mean, self.image_std)
        title = Path(source).name if isinstance(source, (str, Path)) else "image"
        return _Item({name: pixels}, None, picture, title)

    def _array_item(self, arrays: dict) -> _Item:
        tokens, mask_len = None, None
        if self.mask_name in arrays:
            mask_len = int(np.asarray(arrays[self.mask_name]).sum())
        ids = arrays.get(self.main_input)
        if self.attributed.get(self.main_input) == "token" and ids is not None:
            flat = np.asarray(ids).reshape(-1)
            if mask_len is not None and mask_len < flat.size and np.all(np.asarray(arrays[self.mask_name]).reshape(-1)[mask_len:] == 0):
                arrays = {k: (np.asarray(v)[:, :mask_len] if np.ndim(v) == 2 and np.shape(v)[1] == flat.size else v)
                          for k, v in arrays.items()}   # strip right padding: it is added back per batch
                flat = flat[:mask_len]
            tokens = [self.tokenizer.token(i) if self.tokenizer else str(int(i)) for i in flat]
        return _Item(arrays, tokens, title=" ".join(tokens) if tokens and len(tokens) <= 12 else "input")

    def pad(self, items: Sequence[_Item]) -> tuple[dict[str, np.ndarray], list[int | None]]:
        """One right-padded batch: sequence inputs padded to the longest (ids with the pad id, the mask
        with 0). Returns the feed and each row's real length (None for inputs without a sequence)."""
        feed, lengths = {}, []
        token_names = [n for n in self.explainer.model_inputs
                       if len(self.explainer.inputs[n].shape) == 2 and not isinstance(self.explainer.inputs[n].shape[1], int)]
        seq = {n: [np.asarray(it.inputs[n]).shape[-1] for it in items] for n in token_names}
        longest = max((max(v) for v in seq.values()), default=0)
        for it in items:
            lengths.append(np.asarray(it.inputs[token_names[0]]).shape[-1] if token_names else None)
        if token_names and len(set(lengths)) > 1 and self.mask_name is None:
            raise LrpcError("inputs of different lengths need an attention-mask input to batch them; this model "
                            "has none: explain them one at a time")
        for name in self.explainer.model_inputs:
            rows = []
            for it in items:
                if name not in it.inputs:
                    raise LrpcError(f"input '{name}' is missing; the model takes {', '.join(self.explainer.model_inputs)}")
                a = np.asarray(it.inputs[name])
                a = a[None] if a.ndim == len(self.explainer.inputs[name].shape) - 1 else a
                if name in token_names and a.shape[-1] < longest:
                    fill = self.tokenizer.pad_id if (name == "input_ids" and self.tokenizer) else 0
                    a = np.concatenate([a, np.full((a.shape[0], longest - a.shape[-1]), fill, a.dtype)], axis=-1)
                rows.append(a)
            feed[name] = np.concatenate(rows, axis=0)
        return feed, lengths

    # ---- targets -------------------------------------------------------------------------------
    def _class_index(self, target) -> int:
        if isinstance(target, (int, np.integer)):
            return int(target)
        if isinstance(target, str):
            if re.fullmatch(r"-?\d+", target.strip()):
                return int(target)
            label2id = self.config.get("label2id") or {}
            if target in label2id:
                return int(label2id[target])
            if self.tokenizer is not None:
                return self.tokenizer.token_id(target)
            raise LrpcError(f"target {target!r}: give a class index, or a tokenizer (--tokenizer) for token strings")
        raise LrpcError(f"target must be an index or a token / label string, got {target!r}")

    def label(self, index: int) -> str:
        id2label = self.config.get("id2label") or {}
        if str(index) in id2label:
            return f"{id2label[str(index)]!r} ({index})"
        if self.rank == 3 and self.tokenizer is not None:
            return f"{self.tokenizer.token(index)!r} ({index})"
        return f"class {index}"

    # ---- the run -------------------------------------------------------------------------------
    def attribute(self, inputs=None, target=None, *, position: int | None = None, contrast=None,
                  top_k: int | None = None, image=None, batch_size: int = 16, progress=None):
        """Explain `inputs` (text, a list of texts, a dict of arrays with a batch axis, a list of dicts,
        an image path / PIL image with `image=`). target: None (the predicted class / next token), an
        index, or a label / token string; top_k: the k highest-scoring classes; position: the sequence
        position (rank-3 outputs; negative from the end of each input); contrast: explain
        logit[target] − logit[contrast].

        Returns an `Attribution` for one input and one target, else an `Attributions` list (input-major,
        the top-k in descending order)."""
        items = self._items(inputs, image)
        if not items:
            raise LrpcError("nothing to explain")
        results = Attributions()
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results.extend(self._run(chunk, target, position, contrast, top_k))
            if progress is not None:
                progress(len(chunk))
        return results[0] if len(results) == 1 and not top_k and len(items) == 1 else results

    __call__ = attribute

    def _run(self, items, target, position, contrast, top_k) -> list[Attribution]:
        ex = self.explainer
        feed, lengths = self.pad(items)
        n = len(items)
        positions = None
        if self.rank == 3:
            positions = []
            for length in lengths:
                length = length if length is not None else 1
                p = length - 1 if position is None else int(position)
                p = length + p if p < 0 else p
                if not 0 <= p < length:
                    raise LrpcError(f"position {position} is out of range for an input of {length} tokens")
                positions.append(p)
        elif position is not None:
            raise LrpcError(f"output '{ex.explained}' has no sequence axis: drop --position")
        logits = None
        if target is None or top_k or (contrast is not None and target is None):
            y = ex.forward(feed)[ex.explained].astype(np.float32)
            logits = y[np.arange(n), positions] if self.rank == 3 else y
        classes = self._num_classes(feed, logits)
        rows = []   # (item, class, contrast)
        b_index = None if contrast is None else self._class_index(contrast)
        for i in range(n):
            if top_k:
                if top_k < 1 or (classes and top_k > classes):
                    raise LrpcError(f"top-k {top_k} must be between 1 and {classes}")
                chosen = [int(c) for c in np.argsort(-logits[i], kind="stable")[:top_k]]
            elif target is None:
                chosen = [int(np.argmax(logits[i]))]
            else:
                chosen = [self._class_index(target)]
            rows.extend((i, c, b_index) for c in chosen)
        for _, c, b in rows:
            for v in (c, b):
                if v is not None and classes and not 0 <= v < classes:
                    raise LrpcError(f"target {v} is out of range for {classes} classes (use 0..{classes - 1})")
        take = np.array([r[0] for r in rows])
        batch = {k: v[take] for k, v in feed.items()}
        pos = np.array([positions[i] for i in take], np.int64) if positions is not None else None
        if self.vector:
            seed = np.zeros((len(rows), classes), np.float32)
            for r, (_, c, b) in enumerate(rows):
                seed[r, c] += 1.0
                if b is not None:
                    seed[r, b] -= 1.0
            out = ex.explain(batch, seed=seed, position=pos)
        else:
            if contrast is not None:
                raise LrpcError("a contrastive target needs a vector-seed explainer: compile with --seed vector, "
                                "or give the original model")
            out = ex.explain(batch, target=np.array([r[1] for r in rows], np.int64), position=pos)
        results = []
        for r, (i, c, b) in enumerate(rows):
            item, length = items[i], lengths[i]
            relevances = {}
            for name in self.attributed:
                rel = out.relevance[name][r]
                if self.attributed[name] == "token" and length is not None:
                    rel = rel[:length]
                relevances[name] = rel
            latent = {}
            for name in self.latent_names:
                value = out.relevance.get(name)
                if value is None:
                    continue
                value = value[r]
                per_token = value.reshape(value.shape[0], -1).sum(axis=1) if value.ndim >= 2 else value
                latent[self.layer_labels.get(name, name)] = per_token[:length] if length is not None else per_token
            label = self.label(c) + (f" − {self.label(b)}" if b is not None else "")
            results.append(Attribution(
                relevance=relevances[self.main_input], tokens=item.tokens, target=c, logit=float(out.logit[r]),
                target_label=label, contrast=b, position=None if pos is None else int(pos[r]),
                input_name=self.main_input, relevances=relevances, latent=latent, image=item.image,
                title=item.title, model=str(self.name)))
        return results

    def _num_classes(self, feed, logits) -> int:
        if logits is not None:
            return int(logits.shape[-1])
        return int(self.explainer._output_dims(feed, None)[1])


def _arange(shape, dtype):
    return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()


def _metadata(model) -> dict:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


_ATTRIBUTORS: dict[tuple, Attributor] = {}


def explain(model, inputs=None, target=None, *, text=None, image=None, position=None, contrast=None,
            top_k=None, tokenizer=None, layers: bool = False, latent: str | None = None,
            preset: str = "attnlrp", cache=None, **options):
    """One call: `lrpc.explain("llama", text="the cat sat on the", target="mat")`. Mirrors `lrpc explain`;
    the Attributor is kept per model and options, so repeated calls reuse the loaded session."""
    if text is not None:
        inputs = text
    key = (model if isinstance(model, (str, Path)) else id(model), str(tokenizer), layers, latent, preset,
           str(cache), tuple(sorted(options.items())))
    attributor = _ATTRIBUTORS.get(key) if not isinstance(model, onnx.ModelProto) else None
    if attributor is None:
        attributor = Attributor(model, tokenizer=tokenizer, layers=layers, latent=latent, preset=preset,
                                cache=cache, **options)
        if not isinstance(model, onnx.ModelProto):
            _ATTRIBUTORS[key] = attributor
    return attributor.attribute(inputs, target, position=position, contrast=contrast, top_k=top_k, image=image)


def carrying_tensors(model) -> list[tuple[str, str, str]]:
    """(tensor name, op type that makes it, shape) of every relevance-carrying tensor: names for --latent."""
    from lrpc.compiler import analyse_and_plan, load
    ir_model = load(model)
    _, carrying, _ = analyse_and_plan(ir_model, "attnlrp")
    return [(v.name, node.op_type, str(v.shape)) for node in ir_model.graph for v in node.outputs
            if v in carrying and v.name]


# ------------------------------------------------------------------------------------------------
# the command line: `lrpc explain`
# ------------------------------------------------------------------------------------------------

EXPLAIN_EXAMPLES = """examples:
  lrpc explain llama --text "the cat sat on the"                  # next token (zoo models: toy word tokenizer)
  lrpc explain bert --text "a great movie" --top-k 3 --html r.html
  lrpc explain model.onnx --tokenizer DIR --text "…" --target mat --contrast dog
  lrpc explain llama --text "the cat sat on the" --layers --png layers.png
  lrpc explain hf-vit --image cat.png --png cat-lrp.png
  lrpc explain model.onnx --input inputs.npz --json
  lrpc explain bert --file inputs.jsonl --json > results.jsonl    # one {"text": …} per line
"""


def add_arguments(p) -> None:
    p.add_argument("model", help="an explainer, an ONNX model, a Hugging Face folder or a zoo name (models are "
                   "compiled on the way with a vector seed and cached under $LRPC_CACHE or ~/.cache/lrpc)")
    source = p.add_argument_group("inputs (one of)")
    source.add_argument("--text", action="append", metavar="TEXT", help="text to explain (repeat for a padded batch)")
    source.add_argument("--image", action="append", metavar="FILE", help="an image for a vision model (resized to "
                        "the model's input size, ImageNet mean/std unless the folder's preprocessor_config.json "
                        "says otherwise)")
    source.add_argument("--input", metavar="FILE.npz", help="arrays named like the model's inputs (with a batch axis)")
    source.add_argument("--file", metavar="FILE.jsonl", help='many inputs, one JSON object a line: {"text": …} or '
                        '{"image": PATH} or {"npz": PATH}, optionally with "target", "contrast", "position", "top_k"')
    t = p.add_argument_group("target (default: the predicted class / next token)")
    t.add_argument("--target", metavar="T", help="a class index, a label, or a token string")
    t.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes (one batch)")
    t.add_argument("--position", type=int, metavar="P", help="sequence position to explain (negative: from the end;"
                   " default: the last token)")
    t.add_argument("--contrast", metavar="B", help="explain logit[target] − logit[B]")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with tokenizer.json (default: the model's folder; "
                   "'toy': the 128-word tokenizer of the tiny zoo models, their default)")
    p.add_argument("--task", help="task for a Hugging Face folder")
    p.add_argument("--preset", default="attnlrp", choices=["attnlrp", "cp-lrp", "gxi"])
    p.add_argument("--layers", action="store_true", help="relevance per token per layer (the residual stream)")
    p.add_argument("--latent", metavar="REGEX", help="per-layer relevance of these tensors instead (`lrpc plan "
                   "--tensors` lists them)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="machine-readable output on stdout (JSON lines with --file)")
    out.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    out.add_argument("--png", metavar="PATH", help="write a PNG: the heatmap over the image (vision), the per-layer "
                     "picture (--layers), else a token heatmap; several results get PATH-<n>.png")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--cache", metavar="DIR", help="folder for compiled explainers")
    from lrpc import corpus   # --out, --resume, --engine, …: corpus-scale runs
    corpus.add_arguments(p)


def _jsonable(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def run_cli(args) -> int:
    import sys
    given = [x for x in (args.text, args.image, args.input, args.file) if x]
    if len(given) != 1:
        raise LrpcError("give exactly one of --text, --image, --input, --file")
    if args.top_k is not None and args.target is not None:
        raise LrpcError("--top-k explains the K best classes: drop --target, or drop --top-k")
    if args.batch_size < 1:
        raise LrpcError("--batch-size must be at least 1")
    from lrpc import corpus
    if corpus.wanted(args):
        return corpus.run_cli(args)
    for path in filter(None, [args.html, args.png]):
        parent = Path(path).parent
        if not parent.is_dir():
            raise LrpcError(f"cannot write {path}: folder {parent} does not exist")
    attributor = Attributor(args.model, tokenizer=args.tokenizer, preset=args.preset, layers=args.layers,
                            latent=args.latent, task=args.task, cache=args.cache)
    spec = {"target": args.target, "contrast": args.contrast, "position": args.position, "top_k": args.top_k}
    if args.file:
        groups = _read_jsonl(Path(args.file), spec)
        results = Attributions()
        total = sum(len(g[1]) for g in groups)
        from rich.console import Console
        from rich.progress import Progress
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("explaining", total=total)
            for line_spec, inputs in groups:
                for a in _as_list(attributor.attribute(inputs, batch_size=args.batch_size,
                                                       progress=lambda k: bar.advance(task, k), **line_spec)):
                    results.append(a)
    else:
        if args.text:
            inputs, image = args.text, None
        elif args.image:
            inputs, image = None, args.image
        else:
            inputs, image = _read_npz(Path(args.input)), None
        results = Attributions(_as_list(attributor.attribute(inputs, image=image, batch_size=args.batch_size,
                                                             **spec)))
    if args.json:
        docs = results.to_json()
        if args.file:
            for doc in docs:
                print(json.dumps(doc, default=_jsonable))
        else:
            print(json.dumps(docs[0] if len(docs) == 1 else docs, default=_jsonable, indent=None))
    else:
        results.show()
    if args.html:
        results.to_html(args.html)
        print(f"HTML report: {args.html}", file=sys.stderr if args.json else sys.stdout)
    if args.png:
        written = []
        for i, a in enumerate(results):
            path = Path(args.png) if len(results) == 1 else Path(args.png).with_name(
                f"{Path(args.png).stem}-{i}{Path(args.png).suffix or '.png'}")
            written.append(str(a.save_png(path)))
        print(f"PNG: {', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _as_list(result) -> list:
    return list(result) if isinstance(result, Attributions) else [result]


def _read_npz(path: Path) -> dict:
    if not path.is_file():
        raise LrpcError(f"{path} does not exist")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise LrpcError(f"{path} is not a NumPy .npz file ({exc})") from None


def _read_jsonl(path: Path, defaults: dict) -> list[tuple[dict, list]]:
    """Lines grouped by target options (consecutive lines with the same options run as padded batches)."""
    if not path.is_file():
        raise LrpcError(f"{path} does not exist")
    groups: list[tuple[dict, list]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise LrpcError(f"{path}:{number}: not JSON ({exc})") from None
        if isinstance(doc, str):
            doc = {"text": doc}
        if not isinstance(doc, dict):
            raise LrpcError(f"{path}:{number}: expected an object like {{\"text\": \"…\"}}")
        if "text" in doc:
            item = str(doc["text"])
        elif "image" in doc:
            item = Path(path.parent, doc["image"])
            if item.suffix.lower() not in IMAGE_SUFFIXES or not item.is_file():
                raise LrpcError(f"{path}:{number}: image {item} not found (or not an image file)")
        elif "npz" in doc:
            item = _read_npz(Path(path.parent, doc["npz"]))
        elif "inputs" in doc:
            item = {k: np.asarray(v) for k, v in doc["inputs"].items()}
        else:
            raise LrpcError(f"{path}:{number}: give \"text\", \"image\", \"npz\" or \"inputs\"")
        spec = {k: doc.get(k, defaults.get(k)) for k in ("target", "contrast", "position", "top_k")}
        if groups and groups[-1][0] == spec:
            groups[-1][1].append(item)
        else:
            groups.append((spec, [item]))
    if not groups:
        raise LrpcError(f"{path} has no inputs")
    return groups
