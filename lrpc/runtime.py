"""Running explainers with onnxruntime: input checks, target selection, and the result object."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lrpc import contract, validate
from lrpc.errors import LrpcError, missing_extra

try:
    import onnxruntime as ort
except ModuleNotFoundError:  # the core install has neither wheel: lrpc[cpu] or lrpc[gpu] picks one
    raise ModuleNotFoundError(str(missing_extra("onnxruntime", "lrpc")), name="onnxruntime") from None

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bfloat16)": np.float32,
                "tensor(int16)": np.int16, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
                "tensor(uint64)": np.uint64}


# Targets per run of a `--targets dynamic` explainer (Explainer's target_chunk): K = 64 at 256 tokens on
# the 8-layer llama-bench workload then peaked at 1.43× the single-target explainer (1.73× unchunked or in
# chunks of 32), for 3 extra forwards out of ≈ 80 (README, "Performance").
TARGET_CHUNK = 16


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def cuda_visible() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver loaded."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None


def cpu_only_advice() -> str:
    """Why onnxruntime runs on the CPU although a GPU is visible, and the fix."""
    from importlib import metadata
    installed = [d for d in ("onnxruntime", "onnxruntime-gpu") if _distribution(metadata, d)]
    if "onnxruntime" in installed:
        why = ("the CPU wheel onnxruntime is installed" + (" beside onnxruntime-gpu and shadows it"
                                                           if len(installed) == 2 else ""))
        fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'lrpc[gpu]'"
    else:
        why = "onnxruntime-gpu cannot load CUDA (check the CUDA and cuDNN versions its release needs)"
        fix = "see https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html"
    return f"a CUDA GPU is visible but onnxruntime runs on the CPU: {why}; fix: {fix}"


def _distribution(metadata, name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@dataclass
class Explanation:
    outputs: dict[str, np.ndarray]          # the model's own outputs
    relevance: dict[str, np.ndarray]        # relevance.<name> without the prefix
    target: np.ndarray | None               # explained class index per row (None with a seed vector)
    position: np.ndarray | None             # explained sequence position per row (rank-3 outputs)
    logit: np.ndarray                       # the explained scalar s per row
    # (a K explainer, compiled with --targets: target, position and logit are [batch, K], relevance
    # [batch, K, *input shape]: the K explanations of each row)
    meta: dict = field(default_factory=dict)

    def conservation(self, name: str | None = None) -> np.ndarray:
        """Σ relevance per row (of one attributed input, or all), to compare with `logit`."""
        names = [name] if name else [n for n in self.relevance if n in self.meta.get("attributed", {})]
        return sum(self.relevance[n].reshape(*self.logit.shape, -1).sum(axis=-1) for n in names)


class Explainer:
    """An explainer loaded into an onnxruntime session. `.provider` says where it runs."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, providers: list[str] | None = None,
                 threads: int | None = None, graph_optimization: bool = True, low_memory: bool | None = None,
                 session_config: dict[str, str] | None = None, target_chunk: int | None = TARGET_CHUNK):
        """low_memory: run without onnxruntime's pre-packed weight copies (less memory, ~6% slower on CPU);
        None (default): on for explainers compiled with --checkpoint, off otherwise. session_config:
        onnxruntime session config entries (e.g. {"session.intra_op.allow_spinning": "0"}). target_chunk:
        a `--targets dynamic` explainer explains at most this many targets per row in one run (more are
        split into runs of this many, each repeating the forward; None: all at once), which bounds the
        memory of the K-wide relevance pass; not for one compiled with a target_chunk, which loops over
        chunks of K in its graph after one forward."""
        self.target_chunk = None if target_chunk is None else validate.at_least_one(target_chunk, "target_chunk")
        if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():   # (a FIFO would hang the read)
            raise LrpcError(f"{model} {'is not a regular file' if Path(model).exists() else 'does not exist'}: give "
                            "the path of an explainer made by `lrpc compile`")
        meta = contract.read_metadata({p.key: p.value for p in model.metadata_props}) \
            if isinstance(model, onnx.ModelProto) else contract.peek_metadata(model)
        if low_memory is None:
            low_memory = contract.wants_low_memory(meta)
        self.low_memory = bool(low_memory)
        options = ort.SessionOptions()
        if self.low_memory:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, str(value))
        if not graph_optimization:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        avoid_known_crashes(options, meta)
        options.log_severity_level = 4  # its errors reach the user as one LrpcError line, not log lines
        self._source = model
        if isinstance(model, onnx.ModelProto):
            source = model.SerializeToString()
        else:
            source = str(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=providers or default_providers())
        except Exception as exc:
            raise LrpcError(f"onnxruntime cannot load {model if not isinstance(model, onnx.ModelProto) else 'the model'}"
                            f": {str(exc).splitlines()[0][:300]}") from None
        self.meta = contract.read_metadata(self.session.get_modelmeta().custom_metadata_map)
        if self.meta is None:
            raise LrpcError("this model is not an lrpc explainer; make one with `lrpc compile MODEL -o OUT`")
        self.provider = self.session.get_providers()[0]
        if not providers and self.provider == "CPUExecutionProvider" and cuda_visible():
            warnings.warn(cpu_only_advice(), stacklevel=2)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # --intervene's scales and --conditions' masks: optional inputs, default 1
        self.scales = {i.name: i for i in self.session.get_overridable_initializers()}
        self.model_inputs = [n for n in self.inputs if not n.startswith("lrp_")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.model_outputs = [n for n in self.outputs if not n.startswith(contract.RELEVANCE_PREFIX)]
        self.explained = self.meta["output"]

    # ---- inputs --------------------------------------------------------------------------------
    def check_inputs(self, inputs: dict) -> dict[str, np.ndarray]:
        """The model inputs as a feed: exactly the model's names, each array validated, and a symbolic
        dim shared by several inputs of one size."""
        feed = checked_feed({n: self.inputs[n] for n in self.model_inputs}, inputs)
        for name, kind in self.meta.get("attributed", {}).items():
            if kind == "token" and name in feed:
                validate.token_ids(feed[name], self.meta.get("vocab", {}).get(name), name)
        sizes: dict[str, tuple[str, int]] = {}  # a symbolic dim shared by inputs must have one size
        for name, array in feed.items():
            for axis, dim in enumerate(self.inputs[name].shape):
                if isinstance(dim, str) and dim:
                    first = sizes.setdefault(dim, (name, array.shape[axis]))
                    if first[1] != array.shape[axis]:
                        raise LrpcError(f"inputs '{first[0]}' and '{name}' disagree on dimension '{dim}' "
                                        f"({first[1]} vs {array.shape[axis]})")
        return feed

    def _run(self, names: list[str], feed: dict) -> list[np.ndarray]:
        try:
            return self.session.run(names, feed)
        except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own exception types)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise LrpcError(f"onnxruntime failed on these inputs (token ids beyond the vocabulary? sizes the "
                            f"model cannot take?): {first}") from None

    def with_scales(self, feed: dict, scales: dict | None, condition: dict | None = None) -> dict:
        """`feed` plus the intervention factors (lrp_scale.<component>.<layer> → one float per unit, or
        {"mlp.0": …} without the prefix) of an explainer compiled with --intervene; the rest stay 1. With
        `condition` ({"mlp.3": unit index or [units] mask}, an explainer compiled with --conditions), the
        relevance is CRP's conditional one: ĝ of each named component multiplied by its mask and the
        relevance bypassing it dropped (docs/design.md, "Conditional heatmaps")."""
        from lrpc.components import BYPASS_PREFIX, MASK_PREFIX, SCALE_PREFIX
        feed = dict(feed)
        for name, factors in (scales or {}).items():
            full = self._optional(SCALE_PREFIX, name, "intervention", "--intervene mlp,heads")
            feed[full] = validate.finite(f"intervention factor '{full}'",
                                         validate.input_array(full, factors, np.float32, self.scales[full].shape))
        for name, mask in (condition or {}).items():
            full = self._optional(MASK_PREFIX, name, "conditional relevance", "--conditions mlp,heads")
            units = self.scales[full].shape[0]
            if isinstance(mask, (int, np.integer)):
                unit = validate.indices("condition unit", [mask], 1, units)[0]
                mask = np.zeros(units, np.float32)
                mask[unit] = 1.0
            feed[full] = validate.finite(f"condition mask '{full}'",
                                         validate.input_array(full, mask, np.float32, [units]))
            feed[BYPASS_PREFIX + full[len(MASK_PREFIX):]] = np.zeros((), np.float32)
        return feed

    def _optional(self, prefix: str, name: str, what: str, option: str) -> str:
        full = name if name.startswith(prefix) else prefix + name
        if full not in self.scales:
            known = [n[len(prefix):] for n in self.scales if n.startswith(prefix)]
            raise LrpcError(f"no {what} input '{full}': this explainer has "
                            f"{', '.join(known) if known else f'none (compile it with {option})'}")
        return full

    def forward(self, inputs: dict, scales: dict | None = None) -> dict[str, np.ndarray]:
        """The model's own outputs. Runs the explainer with a zero seed: one session serves both, so no
        second copy of the weights is loaded. `scales`: intervention factors (`with_scales`)."""
        feed = dict(self.check_inputs(inputs))
        batch = self._batch(feed)
        for name in (contract.TARGET, contract.POSITION, contract.SEED):
            if name in self.inputs:
                spec = self.inputs[name]
                width = [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
                dtype = ORT_TO_NUMPY.get(spec.type, np.float32)
                feed[name] = np.zeros([batch] + width, dtype)
        if contract.SEED in feed:  # the seed's class axis must match the output's
            seq_classes = self.output_dims(feed, allow_forward=False)[1]
            feed[contract.SEED] = np.zeros(feed[contract.SEED].shape[:-1] + (seq_classes or 1,), np.float32)
        return dict(zip(self.model_outputs, self._run(self.model_outputs, self.with_scales(feed, scales))))

    # ---- explaining ----------------------------------------------------------------------------
    def explain(self, inputs: dict, target=None, position=None, seed=None, scales: dict | None = None,
                condition: dict | None = None) -> Explanation:
        """Relevance of every attributed input for y[b, (position,) target] (or Σ_c seed[b,c]·y[b,(pos,)c]).
        A K explainer (compiled with --targets) takes target / position [batch, K] (seed [batch, K,
        classes]) and returns relevance [batch, K, …]. `scales`: intervention factors; `condition`: CRP's
        conditional relevance (`with_scales`)."""
        if "targets" in self.meta:
            return self._explain_k(inputs, target, position, seed, scales, condition)
        feed = self.check_inputs(inputs)
        rank, vector = self.meta["rank"], self.meta["seed"] == "vector"
        forward = None
        batch = self._batch(feed)
        if rank == 3:
            position = np.full(batch, -1, np.int64) if position is None else \
                validate.indices("position", position, batch, None, negative=True)
        elif position is not None:
            raise LrpcError(f"output '{self.explained}' has no sequence axis: drop the position")
        if vector:
            if seed is None:
                raise LrpcError("this explainer was compiled with --seed vector: pass seed=[batch, classes]")
            seed = validate.seed_vector(seed, batch, None)
        elif target is None:
            forward = self.forward(inputs, scales)
            logits = forward[self.explained]
            if rank == 3:
                validate.indices("position", position, batch, logits.shape[1], negative=True)
                logits = logits[np.arange(batch), position]
            target = logits.argmax(axis=-1).astype(np.int64)
        else:
            target = validate.indices("target", target, batch, None)
        if rank == 3 or not vector:
            seq, classes = self.output_dims(feed, forward)
            if rank == 3:
                validate.indices("position", position, batch, seq, negative=True)
            if vector:
                validate.seed_vector(seed, batch, classes)
            else:
                validate.indices("target", target, batch, classes)
        feed = self.with_scales(feed, scales, condition)
        if vector:
            feed[contract.SEED] = seed
        else:
            feed[contract.TARGET] = target
        if rank == 3:
            feed[contract.POSITION] = position
        return self._explanation(feed, None if vector else target, position if rank == 3 else None,
                                 seed if vector else None)

    def _explain_k(self, inputs: dict, target, position, seed, scales=None, condition=None) -> Explanation:
        """explain() of a K explainer: every index input is [batch, K] (docs/design.md, "Many targets: the K axis")."""
        feed = dict(self.check_inputs(inputs))
        rank, vector = self.meta["rank"], self.meta["seed"] == "vector"
        k = self.meta["targets"] if isinstance(self.meta["targets"], int) else None
        batch = self._batch(feed)
        seq, classes = self.output_dims(feed)
        if vector:
            if seed is None or target is not None:
                raise LrpcError("this explainer was compiled with --seed vector: pass seed=[batch, K, classes]")
            seed = feed[contract.SEED] = validate.seed_matrix(seed, batch, k, classes)
            width = seed.shape[1]
        else:
            if target is None:
                raise LrpcError("this explainer explains K targets per row (compiled with --targets): pass "
                                "target=[batch, K] class indices")
            target = validate.index_matrix("target", target, batch, k, classes)
            feed[contract.TARGET] = target
            width = target.shape[1]
        if rank == 3:
            position = np.full((batch, width), -1, np.int64) if position is None else \
                validate.index_matrix("position", position, batch, k, seq, negative=True)
            if position.shape[1] != width:
                raise LrpcError(f"position has {position.shape[1]} entries per row and the "
                                f"{'seed' if vector else 'target'} {width}: give one position per target")
            feed[contract.POSITION] = position
        elif position is not None:
            raise LrpcError(f"output '{self.explained}' has no sequence axis: drop the position")
        feed = self.with_scales(feed, scales, condition)
        target, position, seed = None if vector else target, position if rank == 3 else None, seed if vector else None
        # an explainer that loops over chunks of K in its graph (compile's target_chunk) runs the forward once
        if k is not None or self.target_chunk is None or width <= self.target_chunk or self.meta.get("target_chunk"):
            return self._explanation(feed, target, position, seed)
        parts = []   # runs of target_chunk targets, joined along K
        for cut in (slice(s, s + self.target_chunk) for s in range(0, width, self.target_chunk)):
            part = {n: v[:, cut] if n in (contract.TARGET, contract.POSITION, contract.SEED) else v for n, v in feed.items()}
            parts.append(self._explanation(part, *(None if a is None else a[:, cut] for a in (target, position, seed))))
        return Explanation(outputs=parts[0].outputs, target=target, position=position, meta=self.meta,
                           relevance={n: np.concatenate([p.relevance[n] for p in parts], axis=1) for n in parts[0].relevance},
                           logit=np.concatenate([p.logit for p in parts], axis=1))

    def _explanation(self, feed: dict, target, position, seed) -> Explanation:
        """Run the explainer on a complete feed; the explained value per row ([batch], or [batch, K] for a
        K explainer: the index inputs' shape)."""
        results = dict(zip(self.outputs, self._run(self.outputs, feed)))
        _check_finite(results, self.model_outputs, list(self.meta.get("attributed", {})))
        y = results[self.explained].astype(np.float32)
        index = target if seed is None else seed[..., 0]
        rows_of = np.arange(len(y)).reshape((-1,) + (1,) * (index.ndim - 1))
        rows = y[rows_of, position] if position is not None else np.broadcast_to(y[rows_of], index.shape + y.shape[-1:])
        logit = (rows * seed).sum(-1) if seed is not None else np.take_along_axis(rows, target[..., None], -1)[..., 0]
        return Explanation(
            outputs={n: results[n] for n in self.model_outputs},
            relevance={n[len(contract.RELEVANCE_PREFIX):]: results[n] for n in self.outputs
                       if n.startswith(contract.RELEVANCE_PREFIX)},
            target=target, position=position, logit=logit, meta=self.meta)

    def _batch(self, feed) -> int:
        first = next(iter(feed.values()))
        return int(first.shape[0])

    def output_dims(self, feed, forward=None, allow_forward: bool = True) -> tuple[int | None, int | None]:
        """Sequence length (None without one) and class count of the explained output for this feed, from
        symbolic dims or, when they do not say, a forward run (given as `forward`, or run here)."""
        spec = next(o for o in self.session.get_outputs() if o.name == self.explained)
        known = {}
        for name, array in feed.items():
            for dim, size in zip(self.inputs[name].shape, array.shape):
                if isinstance(dim, str):
                    known[dim] = size
        dims = [d if isinstance(d, int) else known.get(d) for d in spec.shape]
        if any(d is None for d in dims[1:]) and allow_forward:
            forward = forward or self.forward({k: v for k, v in feed.items() if k in self.model_inputs})
            dims = list(forward[self.explained].shape)
        seq = dims[1] if len(dims) == 3 else None
        return seq, dims[-1]



def avoid_known_crashes(options, meta: dict | None) -> None:
    """Turn off the onnxruntime optimizers known to crash on this explainer (contract.unsafe_optimizers),
    saying so in one line."""
    unsafe = (meta or {}).get("unsafe_optimizers")
    if unsafe and options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
        options.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(unsafe))
        warnings.warn(f"lrpc: onnxruntime's {', '.join(unsafe)} is off for this float16 model with a Conv (it "
                      "crashes onnxruntime on some such models)", stacklevel=3)


def checked_feed(specs: dict, inputs: dict) -> dict[str, np.ndarray]:
    """`inputs` as a feed for these onnxruntime input specs ({name: NodeArg}): exactly their names, each
    array of the dtype, rank and size they take and finite (lrpc.validate.input_array)."""
    missing = [n for n in specs if n not in inputs]
    unknown = [n for n in inputs if n not in specs]
    if missing or unknown:
        raise LrpcError("wrong inputs: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) +
            ([f"unknown {', '.join(unknown)}"] if unknown else [])) + f"; the model takes {', '.join(specs)}"
            + ("" if not any(n.startswith("lrp_") for n in unknown) else " (targets, positions and seeds are not "
               "inputs here: give --target / --position, in Python explain(target=…, position=…, seed=…))"))
    return {name: validate.input_array(name, inputs[name], ORT_TO_NUMPY.get(spec.type, np.float32), spec.shape)
            for name, spec in specs.items()}


def _check_finite(results: dict, model_outputs: list[str], attributed: list[str]) -> None:
    """Relevance is never handed back NaN / Inf. From finite outputs it is an overflow inside the relevance
    pass (e.g. float16 weights); otherwise an input's ±Inf reached the outputs."""
    outputs_finite = all(np.isfinite(results[n]).all() for n in model_outputs if results[n].dtype.kind == "f")
    for name, value in results.items():
        if name.startswith(contract.RELEVANCE_PREFIX) and not np.isfinite(value).all():
            bare = name[len(contract.RELEVANCE_PREFIX):]
            what = f"input '{bare}'" if bare in attributed else f"tensor '{bare}'"
            if outputs_finite:
                raise LrpcError(f"the relevance of {what} is not finite although the model's outputs are (an "
                                "overflow in the explainer, e.g. float16 weights): compile the model in float32")
            raise LrpcError(f"the relevance of {what} is not finite: an input's ±Inf (or NaN) reached the "
                            "model's outputs, which are not finite either; give finite inputs")
