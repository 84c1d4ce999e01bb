"""Faithfulness evaluation: input-perturbation curves, ABPC and AOPC (AttnLRP paper, Sec. 4.1).

Features are removed in order of relevance — most relevant first (MoRF) and least relevant first
(LeRF) — and the explained scalar is recorded after each step. A faithful attribution makes the
MoRF curve fall fast and the LeRF curve stay high; the area between the two curves (ABPC, LeRF −
MoRF, over the removed fraction in [0, 1]) is the figure of merit (higher is better). AOPC is the
mean drop `s(x) − s(x_k)` along the MoRF curve (higher is better).

Token models are perturbed in embedding space, through the explainer variant that takes the
embedding lookup's output as an input (`compile(..., embeddings_input=True)`): a removed token's
embedding becomes zeros (the paper's setting) or the embedding of a chosen token (`replace="mask"`
/ `"pad"`). Models with a float input (images) have patches removed (set to `fill`).

Methods, all computed with lrpc's own explainers: `attnlrp`, `cp-lrp`, `gxi` (Input×Gradient),
`ig` (Integrated Gradients: the `gxi` explainer on `m` scaled inputs `α_k x`, α_k = (k + ½)/m, zero
baseline, batched; since the explainer returns `R_k = α_k x ⊙ ∇s(α_k x)` summed per feature,
IG = mean_k R_k / α_k), `rollout` (attention rollout, Abnar & Zuidema 2020, over the model's
attention softmax outputs) and `random`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lrpc import safeio, validate
from lrpc.errors import LrpcError
from lrpc.faithfulness import LABELS, Results, abpc, aopc, orders, removal_counts, topk_recovery  # noqa: F401
from lrpc.presets import PRESETS

# every preset's explainer, then the baselines (IG runs the gxi explainer on scaled inputs)
METHODS = (*PRESETS, "ig", "rollout", "random")
REPLACE = ("zero", "mask", "pad")


# ------------------------------------------------------------------------------------------------
# a model prepared for evaluation
# ------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One explained input (batch of one): the model inputs, what to explain, which features count.

    `target`: one class, or a list of classes — several targets of one input, explained by one run of the
    many-targets explainer (docs/design.md, "Many targets: the K axis"), each target with its own curves.
    `features`: for token models the positions that may be removed (default: every position where the
    attention mask is 1); `evidence`: indices into `features` of the true evidence (optional).
    """

    inputs: dict[str, np.ndarray]
    target: int | list[int] | None = None
    seed: np.ndarray | None = None
    features: np.ndarray | None = None
    evidence: list[int] | None = None
    tokens: list[str] | None = None

    def __post_init__(self):
        if self.target is None:
            return
        if np.ndim(self.target) == 0:
            self.target = validate.whole_number(self.target, "an example's target")
            return
        targets = np.asarray(self.target)   # several targets: a list of class indices
        if targets.ndim == 1 and targets.size == 0:
            raise LrpcError("an example has an empty list of targets: give at least one")
        if targets.ndim != 1 or targets.dtype.kind not in "iu" or any(isinstance(t, bool) for t in self.target):
            raise LrpcError(f"an example's target must be a class index or a list of them, got {self.target!r}")
        self.target = [int(t) for t in targets]


def _session(path: Path, threads: int | None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Evaluator:
    """Compiles the explainers a set of methods needs and runs perturbation curves on examples.

    `model`: an ONNX path or ModelProto (the original model, not an explainer). Token models are
    detected from their id input feeding an embedding table (`ids`, default: the first such input);
    otherwise the first float input is perturbed in patches of `patch`×`patch` over its last two axes.
    """

    def __init__(self, model, *, seed: str = "target", output_name: str | None = None, ids: str | None = None,
                 replace: str = "zero", replace_id: int | None = None, patch: int = 1, fill: float = 0.0,
                 rollout_query: str = "mean", ig_steps: int = 16, threads: int | None = None,
                 workdir: str | os.PathLike | None = None, options: dict | None = None):
        from lrpc import compiler
        from lrpc.analysis import embedding_lookups
        from lrpc.graph import const_array, is_float
        if replace not in REPLACE:
            raise LrpcError(f"--replace {replace}: use one of {', '.join(REPLACE)}")
        self.seed_mode, self.replace, self.patch, self.fill = seed, replace, patch, fill
        self.rollout_query, self.threads = rollout_query, threads
        self.ig_steps = validate.at_least_one(ig_steps, "--ig-steps")
        self.options = dict(options or {})
        self._source_dir = Path(model).parent if isinstance(model, (str, os.PathLike)) else None
        self._tmp = tempfile.TemporaryDirectory(prefix="lrpc-eval-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # a private copy beside the explainers, weights in model.onnx.data (explainers saved elsewhere than
        # the source model would point at a data file that is not beside them)
        import onnx
        path = self.workdir / "model.onnx"
        if isinstance(model, (str, os.PathLike)):
            from lrpc.loading import read_proto
            model = read_proto(Path(model))
            onnx.external_data_helper.load_external_data_for_model(model, str(Path(self._source_dir)))
        safeio.publish(path, lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=True,
                                                         location="model.onnx.data"),
                       force=True, companions=["model.onnx.data"])
        model = path
        self.model = model
        ir_model = compiler.load(model)
        graph = ir_model.graph
        from lrpc import contract
        self.output = contract.explained_output(graph, output_name).name
        self.rank = graph.outputs[[o.name for o in graph.outputs].index(self.output)].shape.rank()
        self.ids = None
        for value in graph.inputs:
            if (ids is None or value.name == ids) and not is_float(value) and embedding_lookups(graph, value):
                self.ids = value.name
                table_value = embedding_lookups(graph, value)[0].producer().inputs[0]
                self.table = np.asarray(const_array(table_value), np.float32)
                break
        if ids is not None and self.ids is None:
            raise LrpcError(f"input '{ids}' does not feed an embedding table")
        if self.ids is None:
            floats = [v.name for v in graph.inputs if is_float(v) and not v.is_initializer()]
            if not floats:
                raise LrpcError("the model has neither token ids feeding an embedding nor a float input")
            self.float_input = floats[0]
        self.embeds = None
        if self.ids is not None:
            from lrpc import embeddings
            exposed, _ = embeddings.expose(graph, [self.ids])
            self.embeds = next(iter(exposed))
            if replace == "zero":
                self.replacement = np.zeros(self.table.shape[1], np.float32)
            else:
                if replace_id is None:
                    raise LrpcError(f"--replace {replace} needs the id of the {replace} token (--replace-id)")
                self.replacement = self.table[replace_id]
        self.attention = self._add_attention_outputs(graph)
        import onnx_ir.passes.common as common_passes
        common_passes.RemoveUnusedNodesPass()(ir_model)
        from lrpc.loading import save_model
        forward_path = self.workdir / "forward.onnx"
        save_model(ir_model, forward_path, force=True)
        self.forward_session = _session(forward_path, threads)
        self.inputs = [i.name for i in self.forward_session.get_inputs()]
        self._explainers: dict[str, object] = {}

    @staticmethod
    def _add_attention_outputs(graph) -> list[str]:
        names = []
        for node in graph:
            if node.op_type == "Softmax" and node.outputs[0].shape is not None and node.outputs[0].shape.rank() == 4:
                value = node.outputs[0]
                if not value.is_graph_output():
                    graph.outputs.append(value)
                names.append(value.name)
        return names

    def explainer(self, preset: str, many: bool = False):
        """The preset's explainer; `many`: its --targets dynamic form (several targets per run)."""
        key = (preset, many)
        if key not in self._explainers:
            import lrpc
            path = self.workdir / f"explainer-{preset}{'-k' if many else ''}.onnx"
            lrpc.compile(self.model, preset=preset, seed=self.seed_mode, output=path, force=True,
                         output_name=self.output, attribute=[self.ids or self.float_input],
                         embeddings_input=self.ids is not None, targets="dynamic" if many else None,
                         **({} if preset == "gxi" else self.options))
            self._explainers[key] = lrpc.Explainer(path, providers=["CPUExecutionProvider"],
                                                   threads=self.threads)
        return self._explainers[key]

    # ---- the perturbed quantity ----------------------------------------------------------------
    def base(self, example: Example) -> np.ndarray:
        """The input that is perturbed: the token embeddings [1, s, h], or the float input."""
        if self.ids is not None:
            ids = np.asarray(example.inputs[self.ids])
            validate.token_ids(ids, len(self.table))
            return self.table[ids]
        return np.asarray(example.inputs[self.float_input], np.float32)

    def features(self, example: Example) -> np.ndarray:
        if self.ids is not None:
            if example.features is not None:
                return np.asarray(example.features)
            mask = example.inputs.get("attention_mask")
            n = example.inputs[self.ids].shape[-1]
            return np.flatnonzero(np.asarray(mask).reshape(-1)) if mask is not None else np.arange(n)
        shape = self.base(example).shape
        if len(shape) >= 3 and self.patch > 1:
            return np.arange((shape[-2] // self.patch) * (shape[-1] // self.patch))
        return np.arange(int(np.prod(shape[1:])))

    def _feed(self, example: Example, x: np.ndarray) -> dict[str, np.ndarray]:
        rows = x.shape[0]
        feed = {}
        for name in self.inputs:
            if name == self.embeds or (self.ids is None and name == self.float_input):
                feed[name] = x.astype(np.float32)
            else:
                value = np.asarray(example.inputs[name])
                feed[name] = np.repeat(value, rows, axis=0)
        return feed

    def _remove(self, x: np.ndarray, example: Example, features: np.ndarray, chosen: np.ndarray) -> None:
        """In place on one row x [1, ...]: remove the chosen features (indices into `features`)."""
        if self.ids is not None:
            x[0, features[chosen]] = self.replacement
            return
        if self.patch > 1 and x.ndim >= 3:
            p, width = self.patch, x.shape[-1] // self.patch
            for f in features[chosen]:
                r, c = divmod(int(f), width)
                x[..., r * p:(r + 1) * p, c * p:(c + 1) * p] = self.fill
        else:
            flat = x.reshape(x.shape[0], -1)
            flat[:, features[chosen]] = self.fill

    def scores(self, example: Example, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """The explained scalar for each row of x (perturbed versions of the example's input)."""
        outs = []
        for start in range(0, x.shape[0], batch):
            y = self.forward_session.run([self.output], self._feed(example, x[start:start + batch]))[0]
            if self.rank == 3:
                y = y[:, -1]
            if example.seed is not None:
                outs.append((y * np.asarray(example.seed, np.float32).reshape(1, -1)).sum(-1))
            else:
                outs.append(y[:, example.target])
        return np.concatenate(outs)

    def predict(self, example: Example) -> np.ndarray:
        y = self.forward_session.run([self.output], self._feed(example, self.base(example)))[0]
        return y[0, -1] if self.rank == 3 else y[0]

    # ---- relevance ----------------------------------------------------------------------------
    def _per_feature(self, relevance: np.ndarray, example: Example) -> np.ndarray:
        """Relevance of the perturbed input → one value per feature."""
        features = self.features(example)
        if self.ids is not None:
            return relevance.reshape(relevance.shape[0], -1)[:, features]
        if self.patch > 1 and relevance.ndim >= 3:
            p = self.patch
            h, w = relevance.shape[-2] // p, relevance.shape[-1] // p
            r = relevance.reshape(relevance.shape[0], -1, h, p, w, p).sum(axis=(1, 3, 5))
            return r.reshape(relevance.shape[0], -1)[:, features]
        return relevance.reshape(relevance.shape[0], -1)[:, features]

    def _explain(self, preset: str, example: Example, x: np.ndarray) -> np.ndarray:
        """Relevance per feature, [rows of x, n]; [rows, K, n] for an example with several targets (one run
        of the many-targets explainer)."""
        rows = x.shape[0]
        feed = self._feed(example, x)
        if example.seed is not None:
            result = self.explainer(preset).explain(
                feed, seed=np.repeat(np.asarray(example.seed, np.float32).reshape(1, -1), rows, axis=0))
        elif isinstance(example.target, list):
            targets = np.array(example.target, np.int64)
            result = self.explainer(preset, many=True).explain(feed, target=np.tile(targets, (rows, 1)))
            r = result.relevance[self.ids or self.float_input]
            return self._per_feature(r.reshape((-1,) + r.shape[2:]), example).reshape(rows, len(targets), -1)
        else:
            result = self.explainer(preset).explain(feed, target=np.full(rows, example.target, np.int64))
        return self._per_feature(result.relevance[self.ids or self.float_input], example)

    def relevance(self, method: str, example: Example, rng: np.random.Generator | None = None) -> np.ndarray:
        """One relevance value per feature of the example ([K, features] for K targets)."""
        x = self.base(example)
        n = len(self.features(example))
        if method in PRESETS:
            return self._explain(method, example, x)[0]
        if method == "ig":
            alphas = (np.arange(self.ig_steps, dtype=np.float32) + 0.5) / self.ig_steps
            scaled = alphas.reshape((-1,) + (1,) * (x.ndim - 1)) * np.repeat(x, self.ig_steps, axis=0)
            r = self._explain("gxi", example, scaled)
            return (r / alphas.reshape((-1,) + (1,) * (r.ndim - 1))).mean(axis=0)
        if isinstance(example.target, list):   # the target-free baselines, once per target
            return np.stack([self.relevance(method, replace(example, target=t), rng) for t in example.target])
        if method == "rollout":
            return self._rollout(example, x)
        if method == "random":
            return (rng or np.random.default_rng(0)).standard_normal(n)
        raise LrpcError(f"unknown method '{method}': use {', '.join(METHODS)}")

    def _rollout(self, example: Example, x: np.ndarray) -> np.ndarray:
        if not self.attention:
            raise LrpcError("attention rollout needs Softmax nodes with 4-d outputs (attention probabilities)")
        maps = self.forward_session.run(self.attention, self._feed(example, x))
        seq = maps[0].shape[-1]
        joint = np.eye(seq)
        for a in maps:  # graph order = layer order
            a = a[0].mean(axis=0)
            a = 0.5 * a + 0.5 * np.eye(seq)
            a = a / a.sum(axis=-1, keepdims=True)
            joint = a @ joint
        if self.ids is not None:
            mask = example.inputs.get("attention_mask")
            rows = np.flatnonzero(np.asarray(mask).reshape(-1)) if mask is not None else np.arange(seq)
            per_token = joint[0] if self.rollout_query == "first" else joint[rows].mean(axis=0)
            return per_token[self.features(example)]
        per_token = joint[0] if self.rollout_query == "first" else joint.mean(axis=0)
        n = len(self.features(example))
        return per_token[-n:]  # patch tokens are the last n (after a class token)

    # ---- curves ---------------------------------------------------------------------------------
    def curves(self, example: Example, relevances: dict[str, np.ndarray], steps: int) -> dict[str, tuple]:
        """{method: (MoRF curve, LeRF curve)} for one example; one batched forward run for all."""
        features = self.features(example)
        counts = removal_counts(len(features), steps)
        x = self.base(example)
        rows, index = [], {}
        for method, rel in relevances.items():
            for which, order in zip(("morf", "lerf"), orders(rel)):
                index[(method, which)] = len(rows)
                for k in counts:
                    row = x.copy()
                    self._remove(row, example, features, order[:k])
                    rows.append(row)
        scores = self.scores(example, np.concatenate(rows, axis=0))
        m = len(counts)
        return {method: tuple(scores[index[(method, w)]:index[(method, w)] + m] for w in ("morf", "lerf"))
                for method in relevances}


def evaluate(evaluator: Evaluator, examples: list[Example], methods=METHODS, steps: int = 10,
             name: str = "model", seed: int = 0, keep_relevance: bool = False) -> Results:
    """Perturbation curves of every method on every example (Python API)."""
    import time
    validate.at_least_one(steps, "--steps")
    start = time.perf_counter()
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LrpcError(f"unknown method(s) {', '.join(unknown)}: use {', '.join(METHODS)}")
    if not examples:
        raise LrpcError("no examples to evaluate")
    rng = np.random.default_rng(seed)
    morf = {m: [] for m in methods}
    lerf = {m: [] for m in methods}
    hits = {m: [] for m in methods}
    kept = {m: [] for m in methods}
    for example, rels in _relevances(evaluator, examples, methods, rng):
        for m, (a, b) in evaluator.curves(example, rels, steps).items():
            morf[m].append(a)
            lerf[m].append(b)
            if example.evidence is not None:
                hits[m].append(topk_recovery(rels[m], example.evidence))
            if keep_relevance:
                kept[m].append(rels[m])
    results = Results(name, methods, {m: np.array(v) for m, v in morf.items()},
                      {m: np.array(v) for m, v in lerf.items()},
                      {m: float(np.mean(v)) for m, v in hits.items() if v}, kept if keep_relevance else {})
    results.seconds = time.perf_counter() - start
    return results


def _relevances(evaluator: Evaluator, examples: list[Example], methods: list[str], rng):
    """(one-target example, {method: relevance per feature}) for every target of every example: an
    example with several targets is explained once per method for all of them, then split."""
    for example in examples:
        if isinstance(example.target, list) and example.seed is not None:
            raise LrpcError("an example has both a seed vector and a list of targets: give one of them")
        rels = {m: np.asarray(evaluator.relevance(m, example, rng), np.float64) for m in methods}
        if not isinstance(example.target, list):
            yield example, rels
            continue
        for k, target in enumerate(example.target):
            yield replace(example, target=target), {m: r[k] for m, r in rels.items()}


# ------------------------------------------------------------------------------------------------
# sentence similarity (a sentence encoder, explained scalar = cosine through a vector seed)
# ------------------------------------------------------------------------------------------------

def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Tab-separated sentence pairs, one per line; '#' lines and blank lines are skipped."""
    if not Path(path).is_file():
        raise LrpcError(f"{path} does not exist: give a file of tab-separated sentence pairs")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LrpcError(f"{path} is not UTF-8 text: give a file of tab-separated sentence pairs") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise LrpcError(f"{path}:{number}: expected two tab-separated sentences")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def similarity_examples(evaluator: Evaluator, pairs, tokenizer, special_ids=(101, 102, 0)) -> list[Example]:
    """Explain sentence A's tokens for cos(e_A, e_B): seed = e_B (the encoder's output is L2-normalised)."""
    examples = []
    for a, b in pairs:
        encodings = [tokenizer.encode(s) for s in (a, b)]
        ex = []
        for enc in encodings:
            ids = np.array([enc.ids], np.int64)
            inputs = {evaluator.ids: ids}
            if "attention_mask" in evaluator.inputs:
                inputs["attention_mask"] = np.ones_like(ids)
            for name in evaluator.inputs:
                if name not in inputs and name != evaluator.embeds:
                    inputs[name] = np.zeros_like(ids)  # token_type_ids
            ex.append(Example(inputs, tokens=list(enc.tokens)))
        e_b = evaluator.predict(ex[1])
        features = np.array([i for i, t in enumerate(ex[0].inputs[evaluator.ids][0]) if int(t) not in special_ids])
        examples.append(Example(ex[0].inputs, seed=e_b, features=features, tokens=ex[0].tokens))
    return examples


def load_tokenizer(path: str | os.PathLike | None):
    """A `tokenizers` tokenizer from tokenizer.json (or a folder holding one); default: the shipped MiniLM's."""
    from lrpc.inputs import read_tokenizer_file
    if path is None:
        from lrpc.demo import minilm_tokenizer
        tokenizer = minilm_tokenizer()
        tokenizer.no_padding()
        return tokenizer
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LrpcError(f"no tokenizer.json at {path}")
    return read_tokenizer_file(path)
