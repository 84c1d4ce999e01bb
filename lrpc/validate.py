"""One validation layer for options and input arrays, shared by the CLI and the Python API.

Each function checks one kind of value and either returns it (converted where that is its job) or raises
an LrpcError of one line naming the value, what is wrong and what to give instead. Nothing here guesses
or repairs: a value that makes no sense is refused, never silently replaced.
"""

from __future__ import annotations

import math
import re

import numpy as np

from lrpc.errors import LrpcError


def finite_number(value: float | None, what: str, *, positive: bool = False) -> float | None:
    """A finite number, > 0 when `positive`, else ≥ 0 (None passes: the option is off)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LrpcError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LrpcError(f"{what} {value!r} is not finite: give a finite number")
    if positive and number <= 0:
        raise LrpcError(f"{what} {value!r} must be greater than 0")
    if number < 0:
        raise LrpcError(f"{what} {value!r} must be 0 or more")
    return number


def at_least_one(value, what: str) -> int:
    """A count that must be a whole number ≥ 1 (top-k, evaluation steps, batch sizes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LrpcError(f"{what} {value!r} must be a whole number")
    if value < 1:
        raise LrpcError(f"{what} {value} must be at least 1")
    return int(value)


def whole_number(value, what: str) -> int:
    """An index given as a whole number (a position, which may be negative)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LrpcError(f"{what} {value!r} must be a whole number")
    return int(value)


def regex(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LrpcError(f"{what} {pattern!r} is not a valid regular expression ({exc})") from None


def rule_options(epsilon=None, gamma_linear=None, gamma_conv=None, rule_nodes=None) -> None:
    """The linear-layer rule options (--epsilon, --gamma-linear, --gamma-conv, --rule-nodes) each make sense."""
    finite_number(epsilon, "--epsilon", positive=True)
    finite_number(gamma_linear, "--gamma-linear")
    finite_number(gamma_conv, "--gamma-conv")
    regex(rule_nodes, "--rule-nodes")


def rule_options_took_effect(plan, options) -> None:
    """--epsilon / --gamma-* that reached no layer would be a silent no-op (like --latent matching nothing,
    which is an error too): refuse, saying whether --rule-nodes filtered every layer out."""
    asked = [flag for flag, value in (("--epsilon", options.epsilon), ("--gamma-linear", options.gamma_linear),
                                      ("--gamma-conv", options.gamma_conv)) if value is not None]
    if not asked or any(r.rule in ("epsilon", "gamma") for r in plan.records.values()):
        return
    if options.rule_nodes:
        raise LrpcError(f"--rule-nodes {options.rule_nodes!r} matches no linear layer, so {', '.join(asked)} would change "
                        "nothing; `lrpc plan` lists the layer names")
    raise LrpcError(f"{', '.join(asked)}: the model has no linear layer with a constant weight on the relevance "
                    "path, so the option would change nothing; drop it")


def export_opset(opset: int | None, newest: int, oldest: int) -> int | None:
    """An --opset the exporter writes as asked (it silently writes another outside this range)."""
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not oldest <= opset <= newest:
        raise LrpcError(f"--opset {opset!r}: give an opset from {oldest} to {newest}")
    return int(opset)


def input_array(name: str, value, dtype: np.dtype, shape: list) -> np.ndarray:
    """A model input: the dtype kind the model takes, its rank (an array without the batch axis is refused,
    not read as a batch of rows), its fixed dims, non-empty, and no NaN or float32 overflow once converted
    to `dtype` (±Inf is allowed: −inf attention masks are common; non-finite relevance is refused after the run)."""
    array = np.asarray(value)
    dtype = np.dtype(dtype)
    if array.dtype.kind not in "biuf" or (array.dtype.kind != dtype.kind and not
                                          (array.dtype.kind in "iu" and dtype.kind in "iu")):
        raise LrpcError(f"input '{name}' has dtype {array.dtype}, the model expects {dtype}")
    rank(name, array, shape)
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim != array.shape[axis]:
            raise LrpcError(f"input '{name}' has size {array.shape[axis]} on axis {axis}, the model expects {dim}")
    if array.size == 0:
        raise LrpcError(f"input '{name}' is empty (shape {list(array.shape)}): give at least one row and one "
                        "token / feature")
    if dtype.kind in "iu" and array.dtype.kind in "iu" and np.iinfo(array.dtype).max > np.iinfo(dtype).max and \
            (array.max() > np.iinfo(dtype).max or array.min() < np.iinfo(dtype).min):
        raise LrpcError(f"input '{name}' holds values beyond {dtype}'s range")
    if dtype.kind != "f":
        return array.astype(dtype, copy=False)
    return finite(f"input '{name}'", array, dtype, allow_inf=True)   # ±Inf masks: see runtime's relevance check


def rank(name: str, array: np.ndarray, shape: list) -> None:
    """The model's rank for this input: an array without the batch axis is refused, not split into rows."""
    if np.ndim(array) != len(shape):
        hint = ": add the batch axis (x[None])" if np.ndim(array) == len(shape) - 1 else ""
        raise LrpcError(f"input '{name}' has rank {np.ndim(array)} (shape {list(np.shape(array))}), the model "
                        f"expects rank {len(shape)} ({shape}){hint}")


def finite(name: str, value, dtype=np.float32, *, allow_inf: bool = False) -> np.ndarray:
    """The array as `dtype`, refused if any entry is NaN or ±Inf there (float64 values beyond float32's
    range become Inf on conversion: refused too, naming them as such). `allow_inf` lets a deliberate ±Inf
    through (an additive −inf attention mask); the explainer then checks that the relevance is finite."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise LrpcError(f"{name} must be numbers, got {_short(value)}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype, copy=False)
    bad = ~np.isfinite(converted)
    if allow_inf:
        bad &= ~np.isinf(array)   # what was ±Inf before the conversion is meant; NaN and overflow are not
    if bad.any():
        if np.isnan(array).any():
            problem = "NaN"
        elif np.isinf(array).any():
            problem = "±Inf"
        else:
            problem = f"values beyond {np.dtype(dtype).name}'s range (largest {np.abs(array).max():.3g})"
        raise LrpcError(f"{name} contains {problem}; relevance is undefined for it: give finite values")
    return converted


def indices(name: str, value, batch: int, size: int | None, *, negative: bool = False) -> np.ndarray:
    """One integer index per batch row (a scalar is broadcast) in [0, size), or [−size, size) when
    negative indices count from the end."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise LrpcError(f"{name} must be an integer index (or one per batch row), got {value!r}")
    array = np.broadcast_to(array.astype(np.int64), (batch,)) if array.ndim == 0 else array.astype(np.int64)
    if array.shape != (batch,):
        raise LrpcError(f"{name} has shape {list(array.shape)}; give one index per batch row ({batch})")
    if size is not None and np.any((array < (-size if negative else 0)) | (array >= size)):
        low = -size if negative else 0
        raise LrpcError(f"{name} {array.tolist()} out of range (use {low}..{size - 1})")
    return array


def components_options(components, per_position: bool) -> None:
    """--components-per-position reshapes the component outputs: alone it would be silently ignored."""
    if per_position and not components:
        raise LrpcError("--components-per-position needs --components (which units to report per position)")


FORWARD_MODES = ("auto", "copy", "shared")   # where an explainer's outputs come from (lrpc/untouched.py)


def forward_option(value: str) -> str:
    if value not in FORWARD_MODES:
        raise LrpcError(f"forward={value!r}: use one of {', '.join(FORWARD_MODES)} (auto: an untouched copy of the "
                        "forward for quantized and float16 models only)")
    return value


def causal_blocks_option(blocks, min_tokens) -> tuple[int, int]:
    """--causal-blocks N (0: off; else 2 … 64 query-row blocks) and its minimum sequence length (≥ N)."""
    for name, value, low in (("causal_blocks", blocks, 0), ("causal_min_tokens", min_tokens, 1)):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise LrpcError(f"--{name.replace('_', '-')} {value!r} ({name}=): give a whole number ≥ {low}")
    blocks, min_tokens = int(blocks), int(min_tokens)
    if blocks == 1 or blocks > 64:
        raise LrpcError(f"--causal-blocks {blocks}: give 0 (off) or 2 … 64 query-row blocks")
    return blocks, max(min_tokens, blocks)


def targets_option(value) -> int | str | None:
    """--targets: K ≥ 1 (a fixed number of targets per input row) or "dynamic" (K chosen per run)."""
    if value is None or value == "dynamic":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LrpcError(f"--targets {value!r}: give a number of targets K ≥ 1, or 'dynamic'")
    return int(value)


def target_chunk_option(value, flag: str = "--target-chunk {value!r} (target_chunk=)") -> int:
    """--target-chunk C: targets per iteration of the in-graph loop over K (0: no loop). flag: how the
    error names the option."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise LrpcError(f"{flag.format(value=value)}: give a whole number ≥ 0 (0: no loop)")
    return int(value)


def index_matrix(name: str, value, batch: int, k: int | None, size: int | None, *,
                 negative: bool = False) -> np.ndarray:
    """K integer indices per batch row, [batch, K] (one row's [K] when the batch is one row: a [batch]
    vector, the single-target shape, is refused rather than read as K targets of every row), in [0, size),
    or [−size, size) when negative indices count from the end; K must be ≥ 1 (and `k` when the explainer
    fixes it)."""
    array = np.asarray(value)
    if array.size == 0 and array.ndim in (1, 2):
        raise LrpcError(f"{name} has K = 0 targets per row; give at least one")
    if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
        raise LrpcError(f"{name} must be integer indices shaped [batch, K], got {_short(value)}")
    array = array.astype(np.int64)
    if array.ndim == 1:
        if batch != 1:
            raise LrpcError(f"{name} has shape {list(array.shape)}; this explainer explains K targets per row: "
                            f"give [batch={batch}, K] (one target per row: [[t] for t in {name}])")
        array = array[None]
    if array.shape[0] != batch:
        raise LrpcError(f"{name} has shape {list(array.shape)}; give [batch={batch}, K]")
    if k is not None and array.shape[1] != k:
        raise LrpcError(f"{name} has K = {array.shape[1]} per row, this explainer was compiled with --targets {k}")
    if size is not None:
        low = -size if negative else 0
        bad = np.argwhere((array < low) | (array >= size))
        if len(bad):
            row, column = bad[0]
            raise LrpcError(f"{name} {array[row, column]} (row {row}, target {column}) is out of range: use "
                            f"{low}..{size - 1}")
    return array


def _short(value, limit: int = 80) -> str:
    """A value as it appears in a message: its repr, cut to one short line."""
    text = " ".join(repr(value.tolist() if isinstance(value, np.ndarray) else value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def seed_vector(value, batch: int, classes: int | None) -> np.ndarray:
    """A seed [batch, classes] (a [classes] vector is used for every row), finite as float32."""
    seed = finite("seed", value)
    if seed.ndim == 1:
        seed = np.broadcast_to(seed, (batch, seed.shape[0])).copy()
    if seed.ndim != 2 or seed.shape[0] != batch:
        raise LrpcError(f"seed has shape {list(seed.shape)}; give [classes] or [batch={batch}, classes]")
    if classes is not None and seed.shape[1] != classes:
        raise LrpcError(f"seed has {seed.shape[1]} columns, the explained output has {classes} classes")
    return seed


def seed_matrix(value, batch: int, k: int | None, classes: int | None) -> np.ndarray:
    """K seed vectors per batch row, [batch, K, classes] (one row's [K, classes] when the batch is one row),
    finite as float32; K ≥ 1 (and `k` when the explainer fixes it)."""
    seed = finite("seed", value)
    if seed.ndim == 2 and batch == 1:
        seed = seed[None]
    want = f"[batch={batch}, K{'=' + str(k) if k else ''}, classes={classes}] with K ≥ 1"
    if seed.ndim == 2:
        raise LrpcError(f"seed has shape {list(seed.shape)}; this explainer explains K targets per row: give {want} "
                        "(one seed per row: seed[:, None])")
    if seed.ndim != 3 or seed.shape[0] != batch or seed.shape[1] == 0 or (k is not None and seed.shape[1] != k) \
            or (classes is not None and seed.shape[2] != classes):
        raise LrpcError(f"seed has shape {list(seed.shape)}; give {want}")
    return seed


def conditions_option(value: str, selectors: list[str]) -> dict[str, int]:
    """`lrpc explain --conditions mlp.3=17[,heads.1=2…]` → {"mlp.3": 17, …}: CRP's conditional relevance
    through those units (`Explainer.explain(condition=…)`), the components among `selectors`
    (lrpc.components.SELECTORS); whether the layer and unit exist is the explainer's to say."""
    condition: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        component, equals, unit = part.partition("=")
        kind, dot, layer = component.strip().partition(".")
        if not (equals and dot and kind in selectors and layer.isdigit() and unit.strip().isdigit()):
            raise LrpcError(f"--conditions {part!r}: give COMPONENT.LAYER=UNIT (e.g. mlp.3=17; components "
                            f"{', '.join(selectors)}; several: comma-separated)")
        if component.strip() in condition:
            raise LrpcError(f"--conditions names {component.strip()} twice: give one unit per component")
        condition[component.strip()] = int(unit)
    return condition


def token_ids(ids, vocab: int | None, name: str = "input_ids") -> None:
    """Token ids the model's embedding table has rows for (a tokenizer that is not the model's gives more);
    never negative (an embedding lookup would silently read a row counted from the end)."""
    if np.size(ids) and int(np.min(ids)) < 0:
        raise LrpcError(f"input '{name}' holds the negative token id {int(np.min(ids))}: token ids count from 0")
    if vocab and np.size(ids) and int(np.max(ids)) >= vocab:
        raise LrpcError(f"input '{name}' holds token id {int(np.max(ids))} but the model's vocabulary has {vocab} "
                        "entries: for text, pass the model's own tokenizer with --tokenizer")


def known_token(token: str, ids: list[int], unknown_id: int | None) -> int:
    """The one id a target word encodes to; a word the tokenizer maps to its unknown token is refused."""
    if len(ids) != 1:
        raise LrpcError(f"target {token!r} is {len(ids)} tokens for this tokenizer, not one: give one token or "
                        "its id")
    if unknown_id is not None and ids[0] == unknown_id:
        raise LrpcError(f"target {token!r} is not in the tokenizer's vocabulary (it would be the unknown token): "
                        "give a known token or its id")
    return int(ids[0])
