"""Explanations people can use: `lrpc.Attributor` and `lrpc.explain`, the Python side of `lrpc explain`.

    import lrpc
    lrp = lrpc.Attributor("llama")                       # a zoo name, HF folder, ONNX model or explainer
    result = lrp.attribute("the cat sat on the", target="mat")   # Captum's attribute(inputs, target=...)
    result.relevance, result.tokens, result.target, result.logit
    result.show(); result.to_html("report.html")
    lrpc.explain("hf-vit", image="cat.png").save_png("cat-lrp.png")
    lrpc.explain("clip", image="cat.png", text="a cat").show()   # image–text similarity, both towers

Models are compiled on the way with a *vector* seed (input `lrp_seed`), so one explainer serves every
target kind: the predicted class or next token, a class index / label / token string, the top-k
classes (one run of the same model's K explainer, `--targets dynamic`, with k one-hot seeds per input),
a sequence position and a contrastive target A − B (seed e_A − e_B). Compiled explainers are cached under $LRPC_CACHE or
~/.cache/lrpc (lrpc/cache.py).

Inputs of different lengths run as one right-padded batch through the attention mask; each row is
the input explained alone, and padding gets exactly zero relevance. A model without an attention mask
runs them grouped by length instead (one batch per length). `attribute_file` explains a JSON-lines batch
file, keeping the lines that fail as `LineError`s.
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

from lrpc import contract, embedding, validate
from lrpc.cache import compiled_explainer, is_explainer, model_metadata
from lrpc.compiler import is_torch_module
from lrpc.errors import LrpcError
from lrpc.frontend import DUAL_TOWERS, tower_sources
from lrpc.inputs import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, Tokenizer, load_image
from lrpc.presets import PRESETS
from lrpc.results import Attribution, Attributions, Generation, LineError
from lrpc.runtime import Explainer

HIDDEN_STATES = ("last_hidden_state",)   # an encoder's output without a head (Hugging Face's name)
NOT_A_LANGUAGE_MODEL = ("generation needs a causal language model or an encoder–decoder one (token ids in, "
                        "next-token logits [batch, seq, vocab] out), and {what}: give a model such as GPT-2, LLaMA, "
                        "T5 or BART")


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]            # one input, batch axis of size 1, unpadded
    tokens: list[str] | None = None
    image: np.ndarray | None = None
    title: str = ""
    token_ids: list[int] | None = None
    offsets: list[tuple[int, int]] | None = None


class Attributor:
    """Captum-style: `Attributor(model).attribute(inputs, target=...)`.

    model: a zoo name, a Hugging Face folder, an ONNX file or proto (compiled on the way with a vector
    seed, cached), an explainer file, an `lrpc.Explainer`, or a torch module with `example_inputs` (a dict
    of named tensors, as for `lrpc.compile`). tokenizer: a folder / tokenizer.json (default:
    the model folder's, or the toy word tokenizer for the tiny zoo models). layers=True adds the relevance
    of each layer's residual stream (`latent=REGEX` picks other tensors).
    """

    def __init__(self, model, *, tokenizer=None, preset: str = "attnlrp", layers: bool = False,
                 latent: str | None = None, task: str | None = None, output_name: str | None = None,
                 cache: str | os.PathLike | None = None, providers: list[str] | None = None,
                 threads: int | None = None, session_config: dict[str, str] | None = None, image_mean=None,
                 image_std=None, example_inputs=None, pooling: str | None = None, components: str | None = None,
                 conditions: str | None = None):
        if preset not in PRESETS:
            raise LrpcError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
        self.name = model if isinstance(model, str) else getattr(model, "name", "model")
        self.layer_labels: dict[str, str] = {}
        if is_torch_module(model):   # exported through the torch frontend, then compiled like an ONNX model
            if example_inputs is None:
                raise LrpcError(f"a torch module ({type(model).__name__}) is exported to ONNX first: pass "
                                "example_inputs={'input_ids': ids} (tensors it takes), or give an ONNX file, a "
                                "Hugging Face folder or a zoo name")
            from lrpc.frontend import torch_to_onnx
            self.name = type(model).__name__
            model = torch_to_onnx(model, example_inputs)
        elif not isinstance(model, (str, os.PathLike, onnx.ModelProto, Explainer)):
            raise LrpcError(f"cannot explain a {type(model).__name__}: give a zoo name, a Hugging Face folder, an "
                            "ONNX file or onnx.ModelProto, an explainer, or a torch module with example_inputs")
        given_explainer = isinstance(model, Explainer) or is_explainer(model)
        if pooling is not None and given_explainer:
            raise LrpcError("pooling is compiled into an explainer: give the original model, not an explainer")
        # the model this explainer is compiled from (None: given an explainer), which the K explainer (`_many`)
        # and `similarity` compile again with other options
        self.source = None if given_explainer else model
        self._options = dict(tokenizer=tokenizer, preset=preset, task=task, cache=cache, providers=providers,
                             threads=threads, session_config=session_config)
        # what the K explainer (`_many`) is compiled with besides the seed and K
        self._output = dict(output_name=output_name, pooling=pooling, conditions=conditions)
        self.activations: dict[str, str] = {}   # component → its tensor among the outputs (`components=`)
        self._k_explainer: Explainer | None = None
        if isinstance(model, Explainer):
            self.explainer = model
        elif is_explainer(model):
            if layers and latent is None and not contract.read_metadata(model_metadata(model)).get("latent"):
                raise LrpcError("this explainer has no latent outputs: compile it with --latent REGEX, or give "
                                "the original model")
            self.explainer = Explainer(model, providers, threads, session_config=session_config)
        else:
            path, info = compiled_explainer(model, preset=preset, latent=latent, layers=layers, task=task,
                                            output_name=output_name, pooling=pooling, cache=cache,
                                            components=components, conditions=conditions)
            self.activations = info.get("activations", {})
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
        # an encoder's hidden states: no unit of them is a prediction to explain by default
        self.hidden_states = self.explainer.explained in HIDDEN_STATES
        self.attributed = dict(self.meta["attributed"])
        # the input whose tokens a text gives (an encoder–decoder attributes its decoder's ids too, listed first)
        self.main_input = "input_ids" if "input_ids" in self.attributed else next(iter(self.attributed))
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
            from lrpc import models
            if not Path(model).exists() and models.known(str(model)):
                return dict(models.get(str(model)).config)   # a zoo model's token ids (no config.json)
            path = Path(model)
            folder = path if path.is_dir() else path.parent
            # generation_config.json last: Hugging Face's generate reads the generation ids from it
            for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
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
        if isinstance(tokenizer, (str, os.PathLike)):
            return Tokenizer.load(tokenizer)
        if tokenizer is not None:
            return Tokenizer.from_object(tokenizer)
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            folder = path if path.is_dir() else path.parent
            if (path.is_dir() or path.is_file()) and (folder / "tokenizer.json").is_file():
                return Tokenizer.load(folder)
            from lrpc import models
            if str(model) in ("minilm", "minilm-sentence"):
                return Tokenizer.load(models.minilm_dir())
            if models.known(str(model)) and "input_ids" in self.attributed:
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
        ids, tokens, offsets = self.tokenizer.encode_with_offsets(text)
        vocab = self.config.get("vocab_size") or self.config.get("n_vocab")
        validate.token_ids(ids, vocab)
        return _Item(self._token_arrays(ids), tokens, title=text, token_ids=ids, offsets=offsets)

    def _token_arrays(self, ids: list[int], decoder_ids: list[int] | None = None) -> dict[str, np.ndarray]:
        """The model inputs of one token sequence: the ids, an all-ones mask, zero token types, positions;
        an encoder–decoder's decoder side gets `decoder_ids` (default: its start token alone)."""
        if self.explainer.inputs.get("input_ids") is None:
            raise LrpcError(f"this model takes {', '.join(self.explainer.model_inputs)}, not input_ids: use --input")
        arrays = {"input_ids": np.array([ids], np.int64)}
        for name in self.explainer.model_inputs:
            if name == "input_ids":
                continue
            if name == self.mask_name:
                arrays[name] = np.ones((1, len(ids)), np.int64)
            elif name in ("token_type_ids", "position_ids"):
                arrays[name] = (np.zeros if name == "token_type_ids" else _arange)((1, len(ids)), np.int64)
            elif name.startswith("decoder_"):
                # the text is the source; the target side, without decoder_ids, is the decoder's start token
                # alone: the explained position is then the first output
                decoder = decoder_ids if decoder_ids is not None else [self._decoder_start()]
                arrays[name] = (np.array([decoder], np.int64) if name == "decoder_input_ids"
                                else np.ones((1, len(decoder)), np.int64))
            else:
                raise LrpcError(f"the model also takes '{name}', which text alone does not give: use --input")
        return arrays

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
        return _Item(arrays, tokens, title=" ".join(tokens) if tokens and len(tokens) <= 12 else "input",
                     token_ids=None if tokens is None else [int(i) for i in flat])

    def pad(self, items: Sequence[_Item]) -> tuple[dict[str, np.ndarray], list[int | None]]:
        """One right-padded batch: sequence inputs padded to the longest (ids with the pad id, the mask
        with 0). Returns the feed and each row's real length (None for inputs without a sequence)."""
        feed = {}
        token_names = self._sequence_inputs()
        seq = {n: [np.asarray(it.inputs[n]).shape[-1] for it in items] for n in token_names}
        longest = max((max(v) for v in seq.values()), default=0)
        lengths = [self._length(it) for it in items]
        if token_names and len(set(lengths)) > 1 and self.mask_name is None:   # attribute() groups by length
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

    def _sequence_inputs(self) -> list[str]:
        """The model inputs shaped [batch, seq] with a dynamic seq (token ids, masks, …)."""
        specs = self.explainer.inputs
        return [n for n in self.explainer.model_inputs
                if len(specs[n].shape) == 2 and not isinstance(specs[n].shape[1], int)]

    def _length(self, item: _Item) -> int | None:
        """The row's length: of the input whose positions the output has (seq2seq: the decoder's), else
        of the first sequence input."""
        names = self._sequence_inputs()
        name = self.position_input or (names[0] if names else None)
        return np.asarray(item.inputs[name]).shape[-1] if name is not None and name in item.inputs else None

    def _batches(self, items: Sequence[_Item], batch_size: int) -> list[list[int]]:
        """Indices of `items` per run: consecutive batches of `batch_size`; on a model without an attention
        mask (nothing marks padding) inputs of one length together, one run per length."""
        if self.mask_name is not None or not self._sequence_inputs():
            groups = [list(range(len(items)))]
        else:
            by_length: dict[int | None, list[int]] = {}
            for i, item in enumerate(items):
                by_length.setdefault(self._length(item), []).append(i)
            groups = list(by_length.values())
        return [g[start:start + batch_size] for g in groups for start in range(0, len(g), batch_size)]

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
                  top_k: int | None = None, image=None, seed=None, seed_label: str = "", batch_size: int = 16,
                  progress=None, condition: dict | None = None):
        """Explain `inputs` (text, a list of texts, a dict of arrays with a batch axis, a list of dicts,
        an image path / PIL image with `image=`). target: None (the predicted class / next token), an
        index, or a label / token string; top_k: the k highest-scoring classes; position: the sequence
        position (rank-3 outputs; negative from the end of each input); contrast: explain
        logit[target] − logit[contrast]; seed: a vector over the output's last axis, explain ⟨seed, y⟩
        (an embedding's similarity to another; `seed_label` says what it is), instead of a target;
        condition: CRP's conditional relevance, {"mlp.3": unit or [units] mask} (an Attributor made with
        `conditions=`; `Explainer.explain(condition=…)`).

        Returns an `Attribution` for one input and one target, else an `Attributions` list (input-major,
        the top-k in descending order)."""
        batch_size = validate.at_least_one(batch_size, "batch size")
        items = self._items(inputs, image)
        if not items:
            raise LrpcError("nothing to explain")
        if seed is not None and (target is not None or top_k or contrast is not None):
            raise LrpcError("a seed vector replaces the target: drop target, top_k and contrast")
        results = self._explain_items(items, target, position, contrast, top_k, batch_size, progress,
                                      seed=None if seed is None else np.asarray(seed, np.float32),
                                      seed_label=seed_label, condition=condition)
        return results[0] if len(results) == 1 and not top_k and len(items) == 1 else results

    def _explain_items(self, items, target, position, contrast, top_k, batch_size, progress, seed=None,
                       seed_label: str = "", condition: dict | None = None) -> Attributions:
        """Input-major results (`index`: the input's place in `items`), run in `_batches`; a `seed` vector
        replaces the targets (every row explains ⟨seed, y⟩)."""
        if top_k is not None:
            validate.at_least_one(top_k, "top-k")
        per_item: list[list[Attribution]] = [[] for _ in items]
        for batch in self._batches(items, batch_size):
            chunk = [items[i] for i in batch]
            out = (self._run(chunk, target, position, contrast, top_k, condition) if seed is None
                   else self._run_seed(chunk, seed, seed_label, position, condition))
            k = len(out) // len(batch)   # top_k rows per input, else one
            for j, i in enumerate(batch):
                per_item[i] = out[j * k:(j + 1) * k]
                for a in per_item[i]:
                    a.index = i
            if progress is not None:
                progress(len(batch))
        return Attributions(a for rows in per_item for a in rows)

    def attribute_file(self, path: str | os.PathLike, target=None, *, position: int | None = None, contrast=None,
                       top_k: int | None = None, batch_size: int = 16, progress=None) -> Attributions:
        """Explain a JSON-lines batch file (`lrpc explain --file`): one {"text": …}, {"image": PATH},
        {"npz": PATH} or {"inputs": {…}} a line, optionally with its own "target", "contrast", "position",
        "top_k" (the arguments are the defaults). A line that cannot be explained (not JSON, no input,
        empty text, a target out of range, …) becomes a `LineError` in `.errors` and the others go on.
        Returns the explanations in line order, each with its `line` number."""
        from lrpc.inputs import read_jsonl
        batch_size = validate.at_least_one(batch_size, "batch size")
        defaults = {"target": target, "contrast": contrast, "position": position, "top_k": top_k}
        done: dict[int, list[Attribution]] = {}
        errors: list[LineError] = []
        groups: dict[str, tuple[dict, list]] = {}   # lines with the same target options run together
        lines = read_jsonl(Path(path), defaults)
        for line in lines:
            try:
                if line.error:
                    raise LrpcError(line.error)
                item = self._items(None, image=line.item) if isinstance(line.item, Path) else self._items(line.item)
                if len(item) != 1:
                    raise LrpcError(f"give one input a line (this line holds {len(item)})")
                key = json.dumps(line.spec, sort_keys=True, default=repr)
                groups.setdefault(key, (line.spec, []))[1].append((line.number, item[0]))
            except LrpcError as exc:
                errors.append(_line_error(line.number, exc))
                if progress is not None:
                    progress(1)
        for spec, group in groups.values():
            advanced = 0

            def step(k: int) -> None:
                nonlocal advanced
                advanced += k
                if progress is not None:
                    progress(k)
            try:
                for a in self._explain_items([it for _, it in group], batch_size=batch_size, progress=step, **spec):
                    done.setdefault(group[a.index][0], []).append(a)
            except LrpcError:   # one line failed its batch (or the options are wrong): run each alone to find it
                for number, item in group:
                    try:
                        done[number] = list(self._explain_items([item], batch_size=1, progress=None, **spec))
                    except LrpcError as exc:
                        errors.append(_line_error(number, exc))
                if progress is not None:
                    progress(len(group) - advanced)
        index = {line.number: i for i, line in enumerate(lines)}   # the input's place among the file's inputs
        for number, explained in done.items():
            for a in explained:
                a.index, a.line = index[number], number
        return Attributions((a for number in sorted(done) for a in done[number]), sorted(errors, key=lambda e: e.line))

    __call__ = attribute

    def components(self, texts) -> dict[str, np.ndarray]:
        """Relevance of every unit of the components this Attributor was made with (`components="mlp,heads"`)
        for each text's own prediction: {"mlp.0": [texts, units], …} (docs/design.md, "Components and
        interventions")."""
        if not self.activations:
            raise LrpcError('this Attributor has no components: create it with components="mlp,heads,residual"')
        texts = [texts] if isinstance(texts, str) else list(texts)
        return {name: s["rel"] for name, s in self.unit_scores(texts).items()}

    def unit_scores(self, texts: list) -> dict[str, dict[str, np.ndarray]]:
        """Per sample (a text, or a dict of input arrays such as one image's {"pixel_values": [1, C, H, W]}),
        component (an Attributor made with `components=`) and unit: the ActMax score (the highest
        activation over the sample's positions; a head's activation is the L2 norm of its output
        at a position) with its position, and the RelMax score (the unit's relevance for the sample's own
        prediction, summed over positions) with the position of its largest share."""
        lengths, forward, explanation = self._own_prediction(texts)
        scores = {}
        for name, tensor in self.activations.items():
            act = forward[tensor].astype(np.float32)
            if act.ndim == 4:   # heads: [batch, heads, positions, head_dim] → [batch, positions, heads]
                act = np.linalg.norm(act, axis=-1).transpose(0, 2, 1)
            # [batch, positions]: padding is not real; inputs without a sequence (images) have none
            real = np.arange(act.shape[1])[None, :] < np.array([n or act.shape[1] for n in lengths])[:, None]
            act = np.where(real[:, :, None], act, -np.inf)
            rel = np.where(real[:, :, None], explanation.relevance[name], 0.0)   # [batch, positions, units]
            scores[name] = {"act": act.max(1), "act_pos": act.argmax(1), "rel": rel.sum(1),
                            "rel_pos": np.abs(rel).argmax(1)}
        return scores

    def conditional(self, texts: list[str], component: str, unit: int) -> list[np.ndarray]:
        """CRP's conditional heatmap of each text for one unit (an Attributor made with `conditions=`): the
        relevance of its tokens for the text's own prediction (the RelMax seed) that flows through that unit
        of `component` alone (docs/design.md, "Conditional heatmaps"). All texts run as one batch."""
        lengths, _, explanation = self._own_prediction(texts, {component: unit})
        relevance = explanation.relevance[self.main_input]
        return [relevance[i, :n] for i, n in enumerate(lengths)]

    def _own_prediction(self, texts: list, condition: dict | None = None):
        """(lengths, forward outputs, explanation) of each text's own prediction: the argmax of the
        explained output (at the last real position for a sequence output), optionally conditioned."""
        ex = self.explainer
        feed, lengths = self.pad(self._items(list(texts)))
        forward = ex.forward(feed)
        y = forward[ex.explained]
        if y.ndim == 3:
            position = np.asarray(lengths) - 1
            y = y[np.arange(len(y)), position]
        else:
            position = None
        seed = np.eye(y.shape[-1], dtype=np.float32)[y.argmax(-1)]
        explanation = ex.explain(feed, seed=seed, position=position, condition=condition) \
            if ex.meta["seed"] == "vector" else \
            ex.explain(feed, target=y.argmax(-1), position=position, condition=condition)
        return lengths, forward, explanation

    def _run(self, items, target, position, contrast, top_k, condition=None) -> list[Attribution]:
        ex = self.explainer
        feed, lengths = self.pad(items)
        n = len(items)
        positions = self._positions(lengths, position)
        logits = None
        if target is None and not top_k and self.hidden_states:
            raise LrpcError(f"output '{ex.explained}' is an encoder's hidden states, with no predicted class: give "
                            "--similar-to TEXT (Attributor.similarity: explain a similarity), --target UNIT, or a "
                            "model with a head")
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
        pos = np.array([positions[i] for i in take], np.int64) if positions is not None else None
        per_input = len(rows) // n   # the same number of targets for every input (1, or top-k)
        if per_input > 1 and self.vector and self.source is not None and not self.latent_names:
            # several targets of one input: one run of the K explainer, not the input repeated per target
            out = self._many().explain(feed, seed=_seeds(rows, classes).reshape(n, per_input, classes),
                                       position=None if pos is None else pos.reshape(n, per_input),
                                       condition=condition)
            relevance = {name: v.reshape(n * per_input, *v.shape[2:]) for name, v in out.relevance.items()}
            logit = out.logit.reshape(-1)
        else:
            batch = {k: v[take] for k, v in feed.items()}
            if self.vector:
                out = ex.explain(batch, seed=_seeds(rows, classes), position=pos, condition=condition)
            else:
                if contrast is not None:
                    raise LrpcError("a contrastive target needs a vector-seed explainer: compile with --seed vector, "
                                    "or give the original model")
                out = ex.explain(batch, target=np.array([r[1] for r in rows], np.int64), position=pos,
                                 condition=condition)
            relevance, logit = out.relevance, out.logit
        return self._results(items, lengths, rows, relevance, logit, pos)

    def _run_seed(self, items, seed, seed_label, position, condition=None) -> list[Attribution]:
        """One row per item, all explaining ⟨seed, y⟩."""
        if not self.vector:
            raise LrpcError("a seed vector needs a vector-seed explainer: compile with --seed vector, or give the "
                            "original model")
        feed, lengths = self.pad(items)
        positions = self._positions(lengths, position)
        size = self._num_classes(feed, None)
        if seed.shape != (size,):
            raise LrpcError(f"the seed is shaped {list(seed.shape)}; output '{self.explainer.explained}' needs a "
                            f"vector of {size}")
        pos = None if positions is None else np.array(positions, np.int64)
        out = self.explainer.explain(feed, seed=np.tile(seed, (len(items), 1)), position=pos, condition=condition)
        return self._results(items, lengths, [(i, None, None) for i in range(len(items))], out.relevance, out.logit,
                             pos, seed_label)

    def _positions(self, lengths, position) -> list[int] | None:
        """The explained sequence position of each row (rank-3 outputs), else None."""
        if self.rank != 3:
            if position is not None:
                raise LrpcError(f"output '{self.explainer.explained}' has no sequence axis: drop --position")
            return None
        positions = []
        for length in lengths:
            length = length if length is not None else 1
            p = length - 1 if position is None else validate.whole_number(position, "position")
            p = length + p if p < 0 else p
            if not 0 <= p < length:
                raise LrpcError(f"position {position} is out of range for an input of {length} tokens")
            positions.append(p)
        return positions

    def _results(self, items, lengths, rows, relevance, logit, pos, seed_label: str = "") -> list[Attribution]:
        """One Attribution per row (item index, class, contrast class; class None: a seed vector)."""
        results = []
        for r, (i, c, b) in enumerate(rows):
            item, length = items[i], lengths[i]
            relevances = {}
            for name in self.attributed:
                rel = relevance[name][r]
                if self.attributed[name] == "token" and length is not None:
                    rel = rel[:np.shape(item.inputs[name])[-1]]  # its own length (seq2seq: two)
                relevances[name] = rel
            latent = {}
            for name in self.latent_names:
                value = relevance.get(name)
                if value is None:
                    continue
                value = value[r]
                per_token = value.reshape(value.shape[0], -1).sum(axis=1) if value.ndim >= 2 else value
                latent[self.layer_labels.get(name, name)] = per_token[:length] if length is not None else per_token
            label = seed_label if c is None else self.label(c) + (f" − {self.label(b)}" if b is not None else "")
            results.append(Attribution(
                relevance=relevances[self.main_input], tokens=item.tokens, target=c, logit=float(logit[r]),
                target_label=label, contrast=b, position=None if pos is None else int(pos[r]),
                input_name=self.main_input, relevances=relevances, latent=latent, image=item.image,
                title=item.title, model=str(self.name), token_ids=item.token_ids, offsets=item.offsets))
        return results

    def embed(self, inputs=None, *, image=None) -> np.ndarray:
        """The model's output for each input, [inputs, …] (an embedding model: its embeddings)."""
        items = self._items(inputs, image)
        feed, _ = self.pad(items)
        return self.explainer.forward(feed)[self.explainer.explained].astype(np.float32)

    def similarity(self, a, b, *, pooling: str | None = None) -> Attributions:
        """Why is `a` similar to `b`? The cosine similarity of their pooled, L2-normalised embeddings explained
        over each (`Similarity`; pooling mean|cls|pooler, default: the folder's sentence-transformers pooling,
        else mean). An Attributor made from an explainer uses its output as the embedding."""
        if self.source is None:
            if pooling is not None:
                raise LrpcError("pooling is compiled into an explainer: give the original model, not an explainer")
            return Similarity.of(self, self, self.name).attribute(a, b)
        # the encoder under the head the attributor may explain (a folder exported as feature-extraction)
        return Similarity(self.source, pooling=pooling, **{**self._options, "task": None}).attribute(a, b)

    def _num_classes(self, feed, logits) -> int:
        if logits is not None:
            return int(logits.shape[-1])
        return int(self.explainer.output_dims(feed)[1])

    # ---- many targets of one input: the K explainer ----------------------------------------------
    def _many(self) -> Explainer:
        """The K explainer of the same model (`--targets dynamic`, vector seed; compiled on the way and
        cached): one run explains many targets of one input (docs/design.md, "Many targets: the K axis")."""
        if self._k_explainer is None:
            if self.source is None:
                raise LrpcError("explaining many targets in one run needs the original model (an ONNX file, a "
                                "Hugging Face folder or a zoo name), not a compiled explainer")
            o = self._options
            path, _ = compiled_explainer(self.source, seed="vector", targets="dynamic", preset=o["preset"],
                                         task=o["task"], cache=o["cache"], **self._output)
            self._k_explainer = Explainer(path, o["providers"], o["threads"], session_config=o["session_config"])
        return self._k_explainer

    def generate(self, prompt: str, max_new_tokens: int = 16, *, stop_at_eos: bool = True) -> Generation:
        """Greedily generate up to `max_new_tokens` tokens after `prompt` with the model's own forward in
        onnxruntime (stopping after the model's end-of-sequence token), then explain every generated token
        in ONE run of the K explainer: the `Generation` holds the [generated, prompt + generated] matrix."""
        n = validate.at_least_one(max_new_tokens, "max_new_tokens (--generate)")
        if not isinstance(prompt, str):
            raise LrpcError(f"generation takes one prompt text, got a {type(prompt).__name__}: call generate once "
                            "per prompt")
        if self.rank != 3 or self.attributed.get(self.main_input) != "token" or self.hidden_states:
            raise LrpcError(NOT_A_LANGUAGE_MODEL.format(what=f"output '{self.explainer.explained}' is not one"))
        item = self._text_item(prompt)
        source = [int(i) for i in item.inputs["input_ids"][0]]
        seq2seq = "decoder_input_ids" in self.explainer.inputs
        # the ids the answer extends: a causal LM's prompt, an encoder–decoder's decoder start token
        ids = [self._decoder_start()] if seq2seq else list(source)

        def arrays() -> dict[str, np.ndarray]:
            return self._token_arrays(source, ids) if seq2seq else self._token_arrays(ids)
        start, stop = len(ids), self._eos_ids() if stop_at_eos else set()
        forced = self._forced_tokens(start, n)
        logits = None
        for step in range(n):
            previous = logits
            try:
                logits = self.explainer.forward(arrays())[self.explainer.explained]
            except LrpcError as exc:
                if step == 0:
                    raise
                # a model with learned positions has a longest input: say where it ends, not just the op
                raise LrpcError(f"the model fails on {len(ids)} tokens ({start} of the prompt + {step} generated; "
                                f"its positions end?): give max_new_tokens (--generate) ≤ {step} for this "
                                f"prompt — {exc}") from None
            self._check_next_token_logits(logits, previous)
            # the first maximum, as torch.argmax (greedy decoding), among the tokens the config allows
            scores = self._greedy_scores(logits[0, -1], ids, step, start)
            allowed = forced.get(step)
            ids.append(int(np.argmax(scores)) if allowed is None else allowed[int(np.argmax(scores[allowed]))])
            if ids[-1] in stop:
                break
        generated = ids[start:]
        k, classes = len(generated), logits.shape[-1]
        seed = np.zeros((1, k, classes), np.float32)
        seed[0, np.arange(k), generated] = 1.0
        # generated token i is the prediction at position start + i − 1 (of the decoder side for seq2seq). The
        # last token predicts nothing here: the run reads the ids without it (so an answer that fills the
        # model's positions, as Hugging Face's generate allows, still runs), and its column is 0 by causality
        last = ids.pop()
        out = self._many().explain(arrays(), seed=seed, position=np.arange(start - 1, start - 1 + k)[None])
        ids.append(last)
        token = self.tokenizer.token
        # columns: seq2seq: the source, then the decoder's ids; a causal LM: the prompt and the answer
        names = ["input_ids", "decoder_input_ids"] if seq2seq else [self.main_input]
        matrix = np.concatenate([out.relevance[name][0] for name in names] + [np.zeros((k, 1), np.float32)], axis=-1)
        columns = (item.tokens if seq2seq else []) + [token(i) for i in ids]
        return Generation(matrix=np.asarray(matrix, np.float32), source_tokens=columns,
                          generated_tokens=[token(i) for i in generated], generated_ids=generated,
                          prompt_length=len(columns) - k, logits=np.asarray(out.logit[0], np.float32), prompt=prompt,
                          model=str(self.name))

    def _greedy_scores(self, logits: np.ndarray, ids: list[int], step: int, start: int) -> np.ndarray:
        """The next token's scores after the logits processors Hugging Face's greedy `generate` applies as
        the config asks: repetition_penalty over the ids so far, no_repeat_ngram_size, no EOS before
        min_length / min_new_tokens, suppress_tokens, begin_suppress_tokens at the first free step (forced
        BOS / EOS are `_forced_tokens`). Beam search (num_beams > 1) is not followed: decoding is greedy."""
        config, scores = self.config, np.array(logits, np.float32)
        penalty = float(config.get("repetition_penalty") or 1.0)
        if penalty != 1.0:
            seen = np.unique(ids)
            factor = np.float32(penalty)
            scores[seen] = np.where(scores[seen] < 0, scores[seen] * factor, scores[seen] / factor)
        size = int(config.get("no_repeat_ngram_size") or 0)
        if size and len(ids) + 1 >= size:   # a token completing an n-gram the ids already hold is banned
            tail = ids[len(ids) - size + 1:]
            banned = [ids[i + size - 1] for i in range(len(ids) - size + 1) if ids[i:i + size - 1] == tail]
            scores[banned] = -np.inf
        if len(ids) < int(config.get("min_length") or 0) or step < int(config.get("min_new_tokens") or 0):
            scores[sorted(self._eos_ids())] = -np.inf
        begin = 1 if start == 1 and config.get("forced_bos_token_id") is not None else 0
        suppressed = list(config.get("suppress_tokens") or []) + (
            list(config.get("begin_suppress_tokens") or []) if step == begin else [])
        scores[suppressed] = -np.inf
        return scores

    def _check_next_token_logits(self, logits: np.ndarray, previous: np.ndarray | None) -> None:
        """Greedy decoding reads the output as a causal model's next-token logits: an output narrower than the
        vocabulary (hidden states, token classes) or one whose earlier positions change when a token is
        appended (a bidirectional encoder) is not that, and its "answer" would be noise."""
        vocab = self.meta.get("vocab", {}).get(self.main_input)
        what = None
        if vocab and logits.shape[-1] < vocab:
            what = f"has {logits.shape[-1]} values per token for a vocabulary of {vocab}"
        elif previous is not None:
            earlier = logits[0, :previous.shape[1]]
            if np.abs(earlier - previous[0]).max() > 1e-3 * max(float(np.abs(previous).max()), 1e-6):
                what = "changes at earlier positions when a token is appended (a bidirectional model)"
        if what:
            raise LrpcError(NOT_A_LANGUAGE_MODEL.format(what=f"output '{self.explainer.explained}' {what}"))

    def _decoder_start(self) -> int:
        """An encoder–decoder's decoder start token (config.json's decoder_start_token_id)."""
        start = self.config.get("decoder_start_token_id")
        if start is None:
            raise LrpcError("the model also takes 'decoder_input_ids', and its decoder start token is unknown: "
                            "give its Hugging Face folder (config.json has decoder_start_token_id), or use --input")
        return int(start)

    def _forced_tokens(self, prefix: int, n: int) -> dict[int, list[int]]:
        """{step: the only tokens allowed} as the config forces them in Hugging Face's generate:
        forced_bos_token_id first after a one-token prefix (an encoder–decoder's start token),
        forced_eos_token_id (one id or a list) at the last of the n steps."""
        def ids(value) -> list[int]:
            return sorted(int(v) for v in (value if isinstance(value, list) else [value]))
        forced = {}
        if self.config.get("forced_bos_token_id") is not None and prefix == 1:
            forced[0] = ids(self.config["forced_bos_token_id"])
        if self.config.get("forced_eos_token_id") is not None:   # applied after the BOS one, as there
            forced[n - 1] = ids(self.config["forced_eos_token_id"])
        return forced

    def _eos_ids(self) -> set[int]:
        """The model's end-of-sequence ids: config.json's eos_token_id, else the tokenizer's EOS token."""
        eos = self.config.get("eos_token_id")
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        for name in ("[EOS]", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>"):
            found = self.tokenizer.backend.token_to_id(name) if self.tokenizer else None
            if found is not None:
                return {int(found)}
        return set()


def _seeds(rows, classes: int) -> np.ndarray:
    """One seed per (input, class, contrast) row: e_class, minus e_contrast when there is one."""
    seed = np.zeros((len(rows), classes), np.float32)
    for r, (_, c, b) in enumerate(rows):
        seed[r, c] += 1.0
        if b is not None:
            seed[r, b] -= 1.0
    return seed


def _line_error(number: int, exc: LrpcError) -> LineError:
    message = str(exc)
    return LineError(number, message if message.startswith(f"line {number}:") else f"line {number}: {message}")


class Similarity:
    """`Similarity(model).attribute(a, b)`: why is `a` similar to `b`? Their similarity s = ⟨e_a, e_b⟩ of unit
    embeddings explained over `a` and over `b` — `lrpc explain ENCODER --text A --similar-to B`, and for a
    dual encoder `lrpc explain clip --image cat.png --text "a cat"`.

    model: any encoder (zoo name, Hugging Face folder, ONNX model): its embedding is pooled (`pooling` mean,
    cls or pooler; default: the folder's sentence-transformers pooling, else mean) and L2-normalised in the
    graph (lrpc/embedding.py), so s is the cosine similarity; a model whose output is one vector per input is
    only normalised. An explainer (compiled with --seed vector) is used as it is. Or a dual encoder (a CLIP
    folder, the zoo's `clip`): a is the image, b the text, each tower its own explainer ending in its
    normalised embedding.

    One mechanism for both: each side is a vector-seed explainer seeded with the other side's embedding, so
    ∂s/∂e_a = e_b and the explained value (the Attribution's logit) is s itself; the chain rule through the
    pooling and the normalisation is in the graph.
    """

    def __init__(self, model, *, pooling: str | None = None, tokenizer=None, task: str | None = None,
                 preset: str = "attnlrp", cache: str | os.PathLike | None = None,
                 providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        options = dict(preset=preset, cache=cache, providers=providers, threads=threads,
                       session_config=session_config)
        towers = tower_sources(model)
        if towers is not None:
            if pooling is not None or task is not None:
                raise LrpcError("a dual encoder pools in its own towers: drop pooling and task")
            (image_source, image_task), (text_source, text_task) = towers["image"], towers["text"]
            self._set(Attributor(image_source, task=image_task, **options),
                      Attributor(text_source, task=text_task, tokenizer=tokenizer, **options), str(model), DUAL_TOWERS)
        elif isinstance(model, Explainer) or is_explainer(model):
            if pooling is not None:
                raise LrpcError("pooling is compiled into an explainer: give the original model, not an explainer")
            embedder = Attributor(model, tokenizer=tokenizer, **options)
            self._set(embedder, embedder, embedder.name)
        else:
            pooling = embedding.check_pooling(pooling) if pooling is not None else embedding.default_pooling(model)
            embedder = Attributor(model, tokenizer=tokenizer, task=task, pooling=pooling, **options)
            self._set(embedder, embedder, embedder.name)

    @classmethod
    def of(cls, first: Attributor, second: Attributor, name: str, sides=("a", "b")) -> Similarity:
        """A similarity over two ready embedding explainers (the same one for a single encoder)."""
        self = cls.__new__(cls)
        self._set(first, second, name, sides)
        return self

    def _set(self, first: Attributor, second: Attributor, name: str, sides=("a", "b")) -> None:
        for side in (first, second):
            if not side.vector or side.rank != 2:
                raise LrpcError(f"{name} does not give one embedding per input ([batch, hidden], compiled with "
                                "--seed vector): give the model itself, which lrpc pools and compiles")
        self.first, self.second, self.name, self.sides = first, second, str(name), sides

    def attribute(self, a, b, *, towers=None) -> Attributions:
        """One Attribution per side (both by default; `towers` names them for a dual encoder: image, text):
        its input's relevance for s = ⟨e_a, e_b⟩."""
        towers = self.sides if towers is None else tuple(towers)
        unknown = set(towers) - set(self.sides)
        if unknown or not towers:
            raise LrpcError(f"towers: choose from {', '.join(self.sides)}, not {', '.join(sorted(unknown)) or 'none'}")
        for x in (a, b):
            if isinstance(x, (list, tuple)):
                raise LrpcError("give one input on each side of a similarity, not a list")
        e_a, e_b = self.first.embed(a)[0], self.second.embed(b)[0]
        results = Attributions()
        if self.sides[0] in towers:
            results.append(self.first.attribute(a, seed=e_b, seed_label=f"similarity with {_describe(b)}"))
        if self.sides[1] in towers:
            results.append(self.second.attribute(b, seed=e_a, seed_label=f"similarity with {_describe(a)}"))
        for r in results:
            r.model = self.name
        return results


def dual_encoder(model, **options) -> Similarity:
    """`Similarity` of an image–text dual encoder; any other model is refused in one line."""
    if tower_sources(model) is None:
        raise LrpcError(f"{model} is not an image–text dual encoder: give a Hugging Face CLIPModel folder or the "
                        "zoo's clip (an image or a text with another: --similar-to)")
    return Similarity(model, **options)


def _describe(x) -> str:
    if isinstance(x, str) and not (Path(x).suffix.lower() in IMAGE_SUFFIXES and Path(x).is_file()):
        return repr(x)
    return Path(x).name if isinstance(x, (str, Path)) else "the image"


def _arange(shape, dtype):
    return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()


_ATTRIBUTORS: dict[tuple, Attributor | Similarity] = {}


def explain(model, inputs=None, target=None, *, text=None, image=None, similar_to=None, pooling=None,
            position=None, contrast=None, top_k=None, tokenizer=None, layers: bool = False, latent: str | None = None,
            preset: str = "attnlrp", cache=None, **options):
    """One call: `lrpc.explain("llama", text="the cat sat on the", target="mat")`. Mirrors `lrpc explain`;
    the Attributor is kept per model and options, so repeated calls reuse the loaded session. With
    `similar_to` (any encoder; `pooling`), or with both `image` and `text` (a dual encoder; `towers` in
    options), a similarity explained over each input (`Similarity`)."""
    key = (model if isinstance(model, (str, Path)) else id(model), str(tokenizer), layers, latent, preset,
           str(cache), tuple(sorted(options.items())))
    if similar_to is not None or (text is not None and image is not None):
        if target is not None or top_k or contrast is not None or position is not None or layers or latent:
            raise LrpcError("a similarity is the explained value: drop target, top_k, contrast, position, layers "
                            "and latent")
        towers = options.pop("towers", None)
        key = ("similarity", pooling, *key)
        build = Similarity if similar_to is not None else dual_encoder
        similarity = _ATTRIBUTORS.get(key) or build(model, pooling=pooling, tokenizer=tokenizer, preset=preset,
                                                    cache=cache, **options)
        _ATTRIBUTORS[key] = similarity
        if similar_to is not None:
            return similarity.attribute(text if text is not None else image if image is not None else inputs,
                                        similar_to)
        return similarity.attribute(image, text, towers=towers)
    if text is not None:
        inputs = text
    attributor = _ATTRIBUTORS.get(key) if not isinstance(model, onnx.ModelProto) else None
    if attributor is None:
        attributor = Attributor(model, tokenizer=tokenizer, layers=layers, latent=latent, preset=preset,
                                cache=cache, **options)
        if not isinstance(model, onnx.ModelProto):
            _ATTRIBUTORS[key] = attributor
    return attributor.attribute(inputs, target, position=position, contrast=contrast, top_k=top_k, image=image)
