"""Explanations people can use: `lrpc.Attributor` and `lrpc.explain`, the Python side of `lrpc explain`.

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
~/.cache/lrpc (lrpc/cache.py).

Inputs of different lengths run as one right-padded batch through the attention mask; each row is
the input explained alone, and padding gets exactly zero relevance.
"""


from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from lrpc import contract, validate
from lrpc.cache import compiled_explainer, is_explainer, model_metadata
from lrpc.errors import LrpcError
from lrpc.inputs import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, Tokenizer, load_image
from lrpc.presets import PRESETS
from lrpc.results import Attribution, Attributions
from lrpc.runtime import Explainer


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
        if preset not in PRESETS:
            raise LrpcError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
        self.name = model if isinstance(model, str) else getattr(model, "name", "model")
        self.layer_labels: dict[str, str] = {}
        if isinstance(model, Explainer):
            self.explainer = model
        elif is_explainer(model):
            if layers and latent is None and not contract.read_metadata(model_metadata(model)).get("latent"):
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
        if "targets" in self.meta:  # its index inputs are [batch, K] (docs/design.md, "Many targets: the K axis")
            raise LrpcError("this explainer explains K targets per row (compiled with --targets): run it with "
                            "lrpc.Explainer(...).explain(inputs, target=[[...]]), or give `lrpc explain` the "
                            "original model or an explainer compiled without --targets")
        self.vector = self.meta["seed"] == "vector"
        self.rank = self.meta["rank"]
        self.attributed = dict(self.meta["attributed"])
        self.main_input = next(iter(self.attributed))
        self.latent_names = list(self.meta.get("latent", []))
        self.config = self._config(model)
        self.tokenizer = self._tokenizer(model, tokenizer)
        self.mask_name = next((n for n in self.explainer.model_inputs if "mask" in n.lower()), None)
        # the input whose length the explained output's positions follow (a seq2seq model's decoder side)
        out_dims = next(o.shape for o in self.explainer.session.get_outputs() if o.name == self.explainer.explained)
        self.position_input = next((n for n in self.explainer.model_inputs if self.rank == 3 and isinstance(
            out_dims[1], str) and self.explainer.inputs[n].shape[1:2] == out_dims[1:2]), None)
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
            arrays = self.explainer.check_inputs(inputs)  # names, dtypes, ranks: [seq] ids are not seq inputs
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
            elif name.startswith("decoder_") and self.config.get("decoder_start_token_id") is not None:
                # the text is the source; the target is the decoder's start token: explain the first output
                start = self.config["decoder_start_token_id"]
                arrays[name] = np.array([[start if name == "decoder_input_ids" else 1]], np.int64)
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
                arrays = {k: (np.asarray(v)[:, :mask_len] if np.ndim(v) == 2 and np.shape(v)[1] == flat.size
                              and not k.startswith("decoder_") else v)
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
            lengths.append(np.asarray(it.inputs[self.position_input or token_names[0]]).shape[-1]
                           if token_names else None)
        if token_names and len(set(lengths)) > 1 and self.mask_name is None:
            raise LrpcError("inputs of different lengths need an attention-mask input to batch them; this model "
                            "has none: explain them one at a time")
        for name in self.explainer.model_inputs:
            rows = []
            for it in items:
                if name not in it.inputs:
                    raise LrpcError(f"input '{name}' is missing; the model takes {', '.join(self.explainer.model_inputs)}")
                a = np.asarray(it.inputs[name])
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
        if top_k is not None:
            validate.at_least_one(top_k, "top-k")
        batch_size = validate.at_least_one(batch_size, "batch size")
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
                if classes and top_k > classes:
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
                    rel = rel[:np.shape(item.inputs[name])[-1]]  # its own length (seq2seq: two)
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
        return int(self.explainer.output_dims(feed)[1])


def _arange(shape, dtype):
    return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()


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
