"""ONNX's backend node tests as a conformance suite for lrpc's relevance (issue 18).

Every node test of the installed `onnx` package (generated from its `onnx.backend.test.case.node` modules;
the wheel ships no data folder; a float64-only test retyped to float32; a test onnxruntime has no kernel for at
its opset converted to an older one where it has; plus lrpc's own cases named `lrpc_*`, `own_cases`) whose
output depends on a float32 input is wrapped so it explains one scalar,
s = Σ_k Σ w_k ⊙ y_k over its float outputs y_k (fixed random w_k), exposed as a [1, 1] output. The wrapper
is compiled with `preset="gxi"` and the relevance R = x ⊙ ĝ is compared with an independent oracle: central
finite differences of s, run in float64 (onnxruntime on the wrapper with its float tensors retyped to
double, else ONNX's numpy reference evaluator where it computes what onnxruntime computes, else float32
onnxruntime with larger steps). The difference
is taken along x ⊙ u for random u, so it estimates ⟨u, x ⊙ ∂s/∂x⟩ = ⟨u, R⟩ directly; a direction where two
step sizes disagree crosses a kink or a tie and is skipped. Each case is then

  exact     every differentiable direction agrees;
  wrong     an explainer was produced and its relevance disagrees (or is not finite): silently wrong;
  crash     an explainer was produced and onnxruntime rejects it or fails, or compile raised something
            other than an LrpcError;
  refused   compile raised an LrpcError (its message must be one line naming the op);
  n/a       no float32 input with a non-zero derivative, a non-finite forward, or nothing differentiable
            at the test point.

Cases compiled with `gxi` are also compiled with `attnlrp`: its relevance must be finite and the forward
outputs bitwise those of the plain model (within float32 rounding of ONNX's reference evaluator where
onnxruntime cannot run the model: ops of other domains that lrpc replaces by their decomposition). Where the attnlrp passes claim no node its explainer is the gxi
one, whose run is checked instead. Collected cases and compiled explainers are cached in the temporary
folder (keyed by the onnx version and by lrpc's sources; the oracle's side by the model alone), so a
rerun takes seconds and a change of lrpc recompiles without redoing the finite differences.

    python tests/conformance.py --report          # the per-op table and the coverage line
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pickle
import re
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrpc import compiler

ROOT = Path(__file__).resolve().parent.parent
MAX_ELEMENTS = 4096      # inputs larger than this (in total) are skipped: the suite must stay fast
DIRECTIONS = 3           # random directions u per attributed input
SCALAR = "lrpc_conformance_s"
WRAPPER_OPSET = 21       # for a test model of another domain only (ai.onnx.ml, ai.onnx.preview.training)
STATUSES = ("exact", "wrong", "crash", "refused", "n/a")


@dataclass
class Case:
    name: str
    op: str                  # the op under test (for an expanded function body: the op it expands)
    model: bytes
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class Outcome:
    case: str
    op: str
    status: str
    detail: str = ""
    attnlrp: str = ""        # "" when fine or not run, else what failed
    attributed: list[str] = field(default_factory=list)


# ---- collecting the node tests ------------------------------------------------------------------

def _cache_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"lrpc-conformance-onnx{onnx.__version__}"
    path.mkdir(exist_ok=True)
    return path


def _float_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input
            if i.name not in inits and i.type.tensor_type.elem_type == TensorProto.FLOAT]


def collect() -> list[Case]:
    """The node tests with a float32 input, small enough to run (cached: onnx builds them in ~40 s); a node
    test whose float inputs are all float64 (CumSum, CumProd, Einsum have no other) also runs retyped to
    float32, and `own_cases()` adds lrpc's cases for ops or forms ONNX ships no float32 node test of."""
    cache = _cache_dir() / f"cases-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}.pickle"
    if cache.exists():  # stored as tuples: this module also runs as __main__
        return [Case(*fields) for fields in pickle.loads(cache.read_bytes())]
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.simplefilter("ignore")
        stdout, sys.stdout = sys.stdout, devnull
        try:
            from onnx.backend.test.case.node import collect_testcases
            raw = collect_testcases(None)
        finally:
            sys.stdout = stdout
    single = {t.name: t.model.graph.node[0].op_type for t in raw if len(t.model.graph.node) == 1}
    cases = []
    for t in raw:
        model, (inputs_list, outputs_list) = t.model, t.data_sets[0] if t.data_sets else (None, None)
        if not _float_inputs(model) and t.data_sets and _double_only(model):
            model, inputs_list, outputs_list = _as_float(model, inputs_list, outputs_list)
        if not _float_inputs(model) or not t.data_sets:
            continue
        names = [i.name for i in model.graph.input]
        inputs = {n: v for n, v in zip(names, map(_tensor, inputs_list)) if isinstance(v, np.ndarray)}
        if len(inputs) != len(inputs_list) or sum(v.size for v in inputs.values()) > MAX_ELEMENTS:
            continue
        outputs = {o.name: v for o, v in zip(model.graph.output, map(_tensor, outputs_list))
                   if isinstance(v, np.ndarray)}
        base = t.name.split("_expanded")[0]
        op = single.get(t.name) or (single.get(base, base.removeprefix("test_")) + " (expanded)")
        cases.append(Case(t.name, op, model.SerializeToString(), inputs, outputs))
    cases += own_cases()
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps([(c.name, c.op, c.model, c.inputs, c.outputs) for c in cases]))
    os.replace(tmp, cache)
    return cases


def _tensor(value):
    """A node test's value; a numpy scalar (a reduced loss, CumSum's axis) as the 0-d array it stands for."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def _double_only(model: onnx.ModelProto) -> bool:
    """A single-node test whose float inputs are all float64."""
    types = {i.type.tensor_type.elem_type for i in model.graph.input}
    return len(model.graph.node) == 1 and TensorProto.DOUBLE in types and TensorProto.FLOAT not in types


def _as_float(model: onnx.ModelProto, inputs: list, outputs: list) -> tuple[onnx.ModelProto, list, list]:
    """A float64 node test retyped to float32: its graph inputs and outputs, and its data."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    def single(v):
        v = _tensor(v)
        return v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v
    return model, [single(v) for v in inputs], [single(v) for v in outputs]


OWN = "lrpc_"   # the name prefix of lrpc's own cases


def own_cases() -> list[Case]:
    """lrpc's own single-node cases, run like the node tests (expected outputs from ONNX's reference evaluator, else
    onnxruntime; an input given as None is left out):
    ops with no float32 node test (GlobalLpPool), zeros in CumProd, Attention's qk_matmul_output modes with a
    mask and a softcap (the node tests have mode 1 only without a mask), and forms whose node tests sit on a
    kink or hold their coordinates constant: 3-D GridSample's grid, RoiAlign's rois in max mode, cubic Resize's
    tf_crop_and_resize roi; a blocked DequantizeLinear at an opset onnxruntime runs (its node test's is newer); a
    float Range whose count is not on a step (the node tests' are); Unique of distinct values (the node tests tie)."""
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(18)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    with_zeros = normal(3, 4)
    with_zeros[0, 1] = with_zeros[2, 1] = with_zeros[2, 3] = 0.0   # one zero, and two in one running product
    specs = [  # name, op, opset, inputs (float32 are attributed; others constant), outputs, attributes
        ("globallppool", "GlobalLpPool", 21, {"x": normal(1, 3, 4, 5)}, 1, {}),
        ("globallppool_p3_3d_zero_channel", "GlobalLpPool", 21,
         {"x": normal(2, 2, 3, 2, 2) * np.array([1, 0], np.float32)[:, None, None, None]}, 1, {"p": 3}),
        ("globallppool_p1", "GlobalLpPool", 21, {"x": normal(1, 2, 6)}, 1, {"p": 1}),
        *((f"cumprod_zeros{'_exclusive' * e}{'_reverse' * r}", "CumProd", 26,
           {"x": with_zeros, "axis": np.array(1, np.int64)}, 1, {"exclusive": e, "reverse": r})
          for e in (0, 1) for r in (0, 1)),
        *((f"attention_qk_matmul_mode{mode}_mask{'_softcap' * bool(cap)}", "Attention", 23,
           {"Q": normal(1, 2, 3, 4), "K": normal(1, 2, 5, 4), "V": normal(1, 2, 5, 4), "attn_mask": normal(3, 5)}, 4,
           {"qk_matmul_output_mode": mode, **({"softcap": cap} if cap else {})})
          for mode in (1, 2) for cap in (0.0, 2.0)),
        *((f"gridsample_3d_{mode}_{padding}{'_align_corners' * corners}", "GridSample", 20,
           {"X": normal(1, 2, 3, 3, 4), "grid": rng.uniform(-1.15, 1.15, (1, 2, 2, 3, 3)).astype(np.float32)}, 1,
           {"mode": mode, "padding_mode": padding, "align_corners": corners})
          for mode, padding, corners in [("linear", p, c) for p in ("zeros", "border", "reflection") for c in (0, 1)]
          + [("nearest", "zeros", 0)]),
        *((f"roialign_max_{transform}_ratio{ratio}", "RoiAlign", 16,
           {"X": normal(2, 2, 5, 6),
            "rois": np.array([[0.6, 0.3, 3.7, 2.9], [1.2, 1.1, 4.4, 4.2], [last, 2.3, 2.1, 5.4]], np.float32),
            "batch_indices": np.array([0, 1, 1], np.int64)}, 1,
           {"mode": "max", "output_height": 2, "output_width": 3, "sampling_ratio": ratio,
            "coordinate_transformation_mode": transform, "spatial_scale": scale})
          # (a roi partly outside the image; with the scale its clamped samples would tie at 0)
          for transform, ratio, scale, last in (("half_pixel", 2, 1.0, -0.4), ("output_half_pixel", 1, 1.0, -0.4),
                                                ("half_pixel", 1, 0.7, 0.7))),
        *((f"resize_cubic_{name}", "Resize", 19,
           {"X": normal(1, 1, 5, 6), "roi": np.array(roi, np.float32), "scales": None,
            "sizes": np.array(sizes, np.int64)}, 1,
           {"mode": "cubic", "coordinate_transformation_mode": transform, **attributes})
          for name, roi, sizes, transform, attributes in (
              ("tf_crop_and_resize", [0, 0, 0.2, 0.3, 1, 1, 0.7, 0.9], [1, 1, 4, 3], "tf_crop_and_resize", {}),
              ("tf_crop_and_resize_exclude_outside_a05", [0, 0, 0.1, 0.35, 1, 1, 0.8, 0.95], [1, 1, 3, 4],
               "tf_crop_and_resize", {"exclude_outside": 1, "cubic_coeff_a": -0.5}),
              ("tf_crop_and_resize_extrapolation", [0, 0, -0.2, 0.15, 1, 1, 0.75, 1.3], [1, 1, 4, 4],
               "tf_crop_and_resize", {"extrapolation_value": 2.0}),
              ("tf_crop_and_resize_axes_3_2", [0.25, 0.1, 0.85, 0.7], [3, 4], "tf_crop_and_resize",
               {"axes": [3, 2]}),
              ("tf_crop_and_resize_one_axis_kept", [0, 0, 0.2, 0.3, 1, 1, 0.7, 0.9], [1, 1, 5, 3],
               "tf_crop_and_resize", {}),
              ("half_pixel_roi_unread", [0, 0, 0.2, 0.3, 1, 1, 0.7, 0.9], [1, 1, 7, 4], "half_pixel", {}))),
        *((f"range_float_{name}", "Range", 21, {k: np.array(v, np.float32) for k, v in zip(("start", "limit", "delta"),
                                                                                           values)}, 1, {})
          for name, values in (("up", (1.25, 5.5, 0.75)), ("down", (3.0, -2.3, -1.3)))),
        *((f"unique_{name}", "Unique", 21, {"x": normal(*shape)}, outputs, attributes)
          for name, shape, outputs, attributes in (("sorted", (2, 3), 1, {}), ("not_sorted", (5,), 1, {"sorted": 0}),
                                                   ("axis", (3, 2), 1, {"axis": 0}))),
        ("dequantizelinear_blocked_scale", "DequantizeLinear", 21,
         {"x": rng.integers(0, 256, (2, 5)).astype(np.uint8), "x_scale": rng.uniform(0.5, 2, (2, 3)).astype(np.float32),
          "x_zero_point": rng.integers(0, 256, (2, 3)).astype(np.uint8)}, 1, {"axis": 1, "block_size": 2}),
    ]
    cases = []
    for name, op, opset, inputs, outputs, attributes in specs:
        names = [f"y{k}" if k in (0, outputs - 1) else "" for k in range(outputs)]
        node = helper.make_node(op, [k if v is not None else "" for k, v in inputs.items()], names, **attributes)
        inputs = {k: v for k, v in inputs.items() if v is not None}
        graph = helper.make_graph([node], name, [helper.make_tensor_value_info(
            k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in names if k])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            expected = ReferenceEvaluator(model).run(None, inputs)
        except Exception:  # noqa: BLE001  (an op ONNX's reference lacks, e.g. GlobalLpPool: onnxruntime runs it)
            expected = _session(model.SerializeToString()).run(None, inputs)
        cases.append(Case(OWN + name, op, model.SerializeToString(), inputs,
                          dict(zip([k for k in names if k], expected))))
    return cases


# ---- the wrapper model and the oracle -----------------------------------------------------------

def wrap(case: Case) -> tuple[onnx.ModelProto, list[str]] | None:
    """The case's model with s = Σ w ⊙ y over its float outputs added as a [1, 1] output, and the names of
    those outputs; None when the forward is not finite or no output is float."""
    model = onnx.load_from_string(case.model)
    graph = model.graph
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):   # the wrapper's own ops need one
        model.opset_import.append(helper.make_opsetid("", WRAPPER_OPSET))
    floats = [o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT
              and o.name in case.outputs]
    if not floats or not all(np.all(np.isfinite(case.outputs[o])) for o in floats):
        return None
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    terms = []
    for k, name in enumerate(floats):
        weight = f"{SCALAR}_w{k}"
        shape = case.outputs[name].shape
        graph.initializer.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, shape).astype(np.float32), weight))
        graph.node.append(helper.make_node("Mul", [name, weight], [f"{SCALAR}_p{k}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"{SCALAR}_p{k}"], [f"{SCALAR}_t{k}"], keepdims=0))
        terms.append(f"{SCALAR}_t{k}")
    graph.node.append(helper.make_node("Sum", terms, [f"{SCALAR}_sum"]))
    graph.initializer.append(numpy_helper.from_array(np.array([1, 1], np.int64), f"{SCALAR}_shape"))
    graph.node.append(helper.make_node("Reshape", [f"{SCALAR}_sum", f"{SCALAR}_shape"], [SCALAR]))
    graph.output.append(helper.make_tensor_value_info(SCALAR, TensorProto.FLOAT, [1, 1]))
    return model, floats


def _as_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The wrapper with every float32 graph input, output and initializer, and every Cast to float32, retyped
    to float64."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    del graph.value_info[:]
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:  # a Cast to float32 inside the model would round the oracle's steps away
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64),
                                                                  init.name))
    return model


class Oracle:
    """s(inputs) in the most precise way this model allows: float64 onnxruntime, float64 reference
    evaluator, or float32 onnxruntime (`precise` False: larger steps, looser tolerance)."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray], skip: tuple[str, ...] = ()):
        self.inputs = inputs
        double = _as_double(model)
        trials = [
            ("ort64", lambda: _session(double.SerializeToString(), optimised=False), True),
            ("ref64", lambda: _Reference(double), True),
            ("ort32", lambda: _session(model.SerializeToString(), optimised=False), False),
        ]
        self.error = None
        runtime = None   # s as the explainer's runtime computes it (float32 onnxruntime), when it can
        for kind, make, precise in trials:
            if kind in skip:
                continue
            try:
                session = make()
                self.session, self.kind, self.precise = session, kind, precise
                feed = self._feed(inputs)
                with np.errstate(all="ignore"):
                    self.s0 = float(np.asarray(session.run([SCALAR], feed)[0]).sum())
                if runtime is None and kind == "ref64":
                    runtime = _runtime_s(model, inputs)
                # a precise oracle must compute the function the explainer's forward computes (ONNX's reference
                # and onnxruntime differ on a few ops, e.g. Resize align_corners with scales)
                if np.isfinite(self.s0) and (runtime is None or abs(self.s0 - runtime) <= 1e-4 * (1 + abs(runtime))):
                    return
            except Exception as exc:  # noqa: BLE001  (any failure: try the next, less precise, oracle)
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.session = None

    def _feed(self, inputs):
        dtype = np.float64 if self.precise else np.float32
        return {k: (np.asarray(v, dtype) if v.dtype == np.float32 else v) for k, v in inputs.items()}

    def s(self, name: str, value: np.ndarray) -> float:
        feed = self._feed({**self.inputs, name: np.asarray(value)})
        with np.errstate(all="ignore"):
            return float(np.asarray(self.session.run([SCALAR], feed)[0], np.float64).sum())

    def directional(self, name: str, u: np.ndarray) -> tuple[float, float] | None:
        """(⟨u, x ⊙ ∂s/∂x⟩ by central differences, its noise), or None where two steps disagree."""
        x = self.inputs[name].astype(np.float64)
        steps = (1e-6, 4e-6) if self.precise else (2e-3, 8e-3)
        limit, floor = (1e-4, 1e-9) if self.precise else (3e-2, 1e-5)
        slopes = []
        for h in steps:
            plus, minus = x * (1 + h * u), x * (1 - h * u)
            if not self.precise:  # the rounding of the steps to float32 is within the tolerance
                plus, minus = plus.astype(np.float32), minus.astype(np.float32)
            try:
                s_plus, s_minus = self.s(name, plus), self.s(name, minus)
            except Exception:  # noqa: BLE001  (the oracle cannot evaluate there: no estimate)
                return None
            # one-sided slopes: they differ at a kink or a tie even where the central ones agree
            slopes += [(s_plus - self.s0) / h, (self.s0 - s_minus) / h]
        if not np.all(np.isfinite(slopes)):
            return None
        central = [(slopes[0] + slopes[1]) / 2, (slopes[2] + slopes[3]) / 2]
        scale = max(abs(v) for v in slopes) + abs(self.s0) * floor
        bound = limit * scale + floor
        # float32's larger steps also see the curvature: one-sided slopes that differ in proportion to the step
        # (the 4× step 4× as much) while the central ones agree are smooth, not a kink
        curved = not self.precise and abs(central[0] - central[1]) <= bound and \
            abs((slopes[2] - slopes[3]) - 4 * (slopes[0] - slopes[1])) <= bound
        if max(slopes) - min(slopes) > bound and not curved:
            return None
        return central[0], abs(central[0] - central[1])


def _runtime_s(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> float | None:
    """s by float32 onnxruntime (None where it cannot run the model)."""
    try:
        return float(np.asarray(_run(model.SerializeToString(), inputs)[SCALAR], np.float64).sum())
    except Exception:  # noqa: BLE001  (no runtime value to check the reference against)
        return None


class _Reference:
    """onnx.reference.ReferenceEvaluator with onnxruntime's run(names, feed) signature."""

    def __init__(self, model):
        from onnx.reference import ReferenceEvaluator
        self.evaluator = ReferenceEvaluator(model)

    def run(self, names, feed):
        return self.evaluator.run(names, feed)


# ---- compiling (cached) and classifying ---------------------------------------------------------

def _sources_key() -> bytes:
    files = sorted((ROOT / "lrpc").glob("*.py")) + sorted((ROOT / "passes").glob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).digest()


_SOURCES = None


def compile_cached(model: onnx.ModelProto, attribute: list[str]) -> dict[str, tuple[str, object]]:
    """{preset: ("ok", explainer bytes) | ("refused", message) | ("error", message)} for gxi and attnlrp,
    cached by model and sources; attnlrp is ("same", "") when its passes claim no node: its explainer is
    then gxi's (the emitter reads only the graph and the plan), so it is neither compiled nor run again.
    The model is loaded (canonicalised) once for both: `lrpc.compile` is `build_explainer(load(model))`."""
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = _sources_key()
    key = hashlib.sha256(_SOURCES + model.SerializeToString() + ",".join(attribute).encode())
    path = _cache_dir() / f"{key.hexdigest()[:24]}.pickle"
    if path.exists():
        return pickle.loads(path.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        *gxi, claims = _compile(model, attribute, "gxi", plan_first="attnlrp")
        attnlrp = ("same", "") if gxi[0] == "ok" and claims == 0 else _compile(model, attribute, "attnlrp")[:2]
    result = {"gxi": tuple(gxi), "attnlrp": attnlrp}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)
    return result


def _compile(model, attribute, preset, plan_first=None) -> tuple[str, object, int | None]:
    """(status, bytes or message, claims): claims is the number of nodes `plan_first`'s passes claim on the
    same loaded model (None when not asked or when that fails)."""
    import lrpc
    import onnx_ir as ir
    claims = None
    try:
        canonical = compiler.load(model)
        if plan_first:
            try:
                claims = len(compiler.analyse_and_plan(canonical, plan_first, attribute)[2].records)
            except Exception:  # noqa: BLE001  (that preset is then compiled on its own, and fails there)
                claims = None
        explainer = compiler.build_explainer(canonical, preset=preset, attribute=attribute, output_name=SCALAR)
        result = ("ok", ir.to_proto(explainer).SerializeToString())
    except lrpc.LrpcError as exc:
        result = ("refused", str(exc))
    except Exception as exc:  # noqa: BLE001  (a traceback from the compiler is a crash of the suite's kind)
        result = ("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return result + (claims,)


def _session(model_bytes: bytes, optimised: bool = True):
    """One way to open a session: the explainers and the plain model as users run them (onnxruntime's
    default optimisations, so their forward outputs compare bitwise); the oracle's unoptimised."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _run(model_bytes: bytes, feed: dict) -> dict[str, np.ndarray]:
    session = _session(model_bytes)
    names = [i.name for i in session.get_inputs()]
    full = {**feed, "lrp_target": np.zeros(1, np.int64)}
    outs = session.run(None, {k: full[k] for k in names})
    return {o.name: v for o, v in zip(session.get_outputs(), outs)}


def _op_types(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                found |= _op_types(g)
    return found


def _refusal_problem(message: str, model: onnx.ModelProto) -> str:
    """What is wrong with a refusal message ('' when it is one line naming an op of the model)."""
    if "\n" in message.strip():
        return "refusal message spans several lines"
    # an op of the model, or one the canonical form introduced (Upsample becomes Resize): "op X" or "(X)"
    if not any(op in message for op in _op_types(model.graph)) and not re.search(r"\bop [A-Z]\w+|\([A-Z]\w+[ )]",
                                                                                   message):
        return "refusal message names no op"
    return ""


# refusals about the test model's form, not about an op: the case does not apply
NOT_ACCEPTED = ("imports no default ONNX opset", "could not upgrade the model")


def measure(case: Case, model: onnx.ModelProto) -> tuple:
    """What is known about the wrapped model without lrpc: ("n/a", why), or ("ok", its outputs from
    onnxruntime, the oracle's kind / precision / s, and per float input the oracle's differences along
    x ⊙ u for each direction u). Cached by the model, onnxruntime's version and this file, so a change
    of lrpc's sources reruns only the compiles and the explainers."""
    import onnxruntime as ort
    key = hashlib.sha256(model.SerializeToString() + ort.__version__.encode() + Path(__file__).read_bytes())
    path = _cache_dir() / f"oracle-{key.hexdigest()[:24]}.pickle"
    if path.exists():
        return pickle.loads(path.read_bytes())
    try:
        plain, forward = _run(model.SerializeToString(), case.inputs), "onnxruntime"
    except Exception as exc:  # noqa: BLE001  (an op onnxruntime has no kernel for: ONNX's reference runs it)
        try:
            plain = dict(zip([o.name for o in model.graph.output], _Reference(model).run(None, case.inputs)))
            forward = "reference: onnxruntime " + _where(str(exc))
        except Exception:  # noqa: BLE001
            plain = None
            result = ("n/a", f"onnxruntime cannot run the original model: {exc}"[:200])
    if plain is not None:
        skip: tuple[str, ...] = ()
        estimates: dict = {}
        imprecise: list[str] = []   # inputs estimated by the float32 oracle after a float64 one
        result = None
        while True:
            oracle = Oracle(model, case.inputs, skip)
            if oracle.session is None:
                result = result or ("n/a", f"the original model does not run: {oracle.error}")
                break
            for name in _float_inputs(model):
                if any(e is not None for _, e in estimates.get(name, [])):
                    continue
                rng = np.random.default_rng(zlib.crc32((case.name + name).encode()))
                us = [rng.standard_normal(case.inputs[name].shape) for _ in range(DIRECTIONS)]
                estimates[name] = [(u, oracle.directional(name, u)) for u in us]
                if result is not None and not oracle.precise and any(e is not None for _, e in estimates[name]):
                    imprecise.append(name)
            result = result or ("ok", plain, {"kind": oracle.kind, "precise": oracle.precise, "s0": oracle.s0,
                                              "forward": forward, "imprecise": imprecise}, estimates)
            # a float64 oracle whose steps disagree everywhere along an input computes it in float32 inside (some
            # kernels and reference ops do, e.g. the reference's cubic Resize in its roi): for that input the
            # float32 one with larger steps is then the better estimate
            if not oracle.precise or all(any(e is not None for _, e in es) for es in estimates.values()):
                break
            skip += (oracle.kind,)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)
    return result


def run_case(case: Case, older: bool = False) -> Outcome:
    wrapped = wrap(case)
    if wrapped is None:
        return Outcome(case.name, case.op, "n/a", "no finite float output")
    model, float_outputs = wrapped
    measured = measure(case, model)
    if measured[0] == "n/a":
        return Outcome(case.name, case.op, "n/a", measured[1])
    _, plain, oracle, estimates = measured
    if oracle["forward"] != "onnxruntime" and not older:
        converted = at_older_opset(case)
        if converted is not None:
            outcome = run_case(converted[0], older=True)
            outcome.detail += f" (converted to opset {converted[1]}: onnxruntime has no kernel at the test's)"
            return outcome
    tiny = 1e-7 * (1 + abs(oracle["s0"]))
    moving = [k for k, es in estimates.items() if any(e is not None and abs(e[0]) > tiny for _, e in es)]
    defined = [k for k, es in estimates.items() if any(e is not None for _, e in es)]
    attribute = moving or defined
    if not attribute:
        return Outcome(case.name, case.op, "n/a", "not differentiable at the test point")
    compiled = compile_cached(model, attribute)
    status, result = compiled["gxi"]
    outcome = Outcome(case.name, case.op, "exact", attributed=attribute)
    if status == "refused":
        if not moving and "does not depend" in result:
            return Outcome(case.name, case.op, "n/a", "zero derivative in every float input", attributed=attribute)
        if any(reason in result for reason in NOT_ACCEPTED):
            return Outcome(case.name, case.op, "n/a", "model form not accepted: " + result, attributed=attribute)
        if "does not depend" in result:  # the analysis misses a dependence the oracle sees
            outcome.status, outcome.detail = "wrong", "compile says the output does not depend on " + \
                ", ".join(moving) + " but it does"
            return outcome
        problem = _refusal_problem(result, model)
        outcome.status, outcome.detail = ("crash", problem + ": " + result) if problem else ("refused", result)
        return outcome
    if status == "error":
        outcome.status, outcome.detail = "crash", "compile raised " + result
        return outcome
    feed = dict(case.inputs)
    try:
        got = _run(result, feed)
    except Exception as exc:  # noqa: BLE001
        message = f"onnxruntime: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        if oracle["forward"] == "reference: onnxruntime " + _where(str(exc)):   # the model's own op, kept
            return Outcome(case.name, case.op, "n/a", "onnxruntime cannot run an op of the model: " + message)
        outcome.status, outcome.detail = "crash", message
        return outcome
    checked = 0
    for name in attribute:
        precise = oracle["precise"] and name not in oracle["imprecise"]
        rtol, atol = (2e-3, 1e-5) if precise else (3e-2, 1e-3)
        relevance = got["relevance." + name].astype(np.float64)
        if not np.all(np.isfinite(relevance)):
            outcome.status, outcome.detail = "wrong", f"relevance of {name} is not finite"
            return outcome
        for u, estimate in estimates[name]:
            if estimate is None:
                continue
            d, noise = estimate
            p = float(np.sum(u * relevance))
            tol = 3 * noise + rtol * (float(np.sum(np.abs(u * relevance))) + abs(d)) + atol
            checked += 1
            if abs(p - d) > tol:
                outcome.status = "wrong"
                outcome.detail = f"⟨u, R_{name}⟩ = {p:.6g}, finite differences ({oracle['kind']}) {d:.6g}"
                return outcome
    outcome.detail = f"{checked} directions, oracle {oracle['kind']}"
    outcome.attnlrp = _check_attnlrp(compiled["attnlrp"], got, plain, attribute, case.inputs, float_outputs,
                                     exact_forward=oracle["forward"] == "onnxruntime")
    return outcome


def at_older_opset(case: Case) -> tuple[Case, int] | None:
    """A test whose op onnxruntime has no kernel for at the test's opset (RoiAlign-22, GlobalLpPool-22,
    OptionalGetElement-28, ...), converted by onnx's version converter to the newest older default opset at
    which onnxruntime runs it and gives the test's outputs, and that opset; None when there is none."""
    from onnx import version_converter
    model = onnx.load_from_string(case.model)
    if [o.domain for o in model.opset_import] not in (["ai.onnx"], [""]):
        return None
    for opset in range(model.opset_import[0].version - 1, 17, -1):
        try:
            older = version_converter.convert_version(model, opset)
            got = _run(older.SerializeToString(), case.inputs)
        except Exception:  # noqa: BLE001  (no conversion, or still no kernel: try an older opset)
            continue
        same = all(np.allclose(got[k], v, rtol=1e-3, atol=1e-6)   # (the tolerance of onnx's backend tests)
                   for k, v in case.outputs.items() if k in got)
        return (Case(case.name, case.op, older.SerializeToString(), case.inputs, case.outputs), opset) if same else None
    return None


def _where(message: str) -> str:
    """What onnxruntime failed on, without node names: its source location, else the op it has no kernel for
    (so the explainer's failure can be told to be the model's own)."""
    found = re.search(r"onnxruntime_src/\S+:\d+", message) or re.search(r"implementation for \w+\(\d+\)", message) \
        or re.search(r"\w+\(-?\d+\) is not a registered function/op", message)
    return found.group(0) if found else message.splitlines()[0][:200] if message else ""


def _check_attnlrp(compiled, got_gxi, plain, attribute, inputs, float_outputs, exact_forward=True) -> str:
    """'' when the attnlrp explainer's relevance is finite and its forward outputs are the plain model's
    (the gxi explainer's run stands for it when it is the same explainer): bit for bit as onnxruntime runs
    the model, or within float32 rounding of ONNX's reference where onnxruntime cannot run it."""
    status, result = compiled
    if status == "same":
        got = got_gxi
    elif status != "ok":
        return f"attnlrp {status}: {result}"
    else:
        try:
            got = _run(result, inputs)
        except Exception as exc:  # noqa: BLE001
            return f"attnlrp: onnxruntime: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    for name in attribute:
        if not np.all(np.isfinite(got["relevance." + name])):
            return f"attnlrp: relevance of {name} is not finite"
    for name in float_outputs + [SCALAR]:
        same = np.array_equal(plain[name], got[name], equal_nan=True) if exact_forward else \
            np.allclose(plain[name], got[name], rtol=1e-5, atol=1e-6)
        if not same:
            change = float(np.max(np.abs(plain[name].astype(np.float64) - got[name])))
            return f"attnlrp: forward output {name} changed (by up to {change:.3g})"
    return ""


def failing(outcome: Outcome) -> bool:
    return outcome.status in ("wrong", "crash") or bool(outcome.attnlrp)


def run_all(cases: list[Case] | None = None) -> list[Outcome]:
    cases = collect() if cases is None else cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [run_case(c) for c in cases]


# ---- the report ---------------------------------------------------------------------------------

def per_op(outcomes: list[Outcome]) -> dict[str, str]:
    """One status per op: wrong/crash if any case is, else exact if any case is, else refused, else n/a."""
    by_op = collections.defaultdict(list)
    for o in outcomes:
        by_op[o.op].append("crash" if o.attnlrp and o.status == "exact" else o.status)
    order = ("wrong", "crash", "exact", "refused", "n/a")
    return {op: next(s for s in order if s in statuses) for op, statuses in sorted(by_op.items())}


def coverage_line(outcomes: list[Outcome]) -> str:
    ops = per_op(outcomes)
    counts = collections.Counter(ops.values())
    cases = collections.Counter(o.status for o in outcomes)
    own = sum(o.case.startswith(OWN) for o in outcomes)
    return (f"ONNX node tests (onnx {onnx.__version__}): {distinct_exact(ops)} distinct ops verified exact; per op "
            f"(expanded function bodies separately): {counts['exact']} exact, {counts['wrong']} wrong, "
            f"{counts['crash']} crash, {counts['refused']} refused, {counts['n/a']} n/a "
            f"(cases: {', '.join(f'{cases[s]} {s}' for s in STATUSES)}; {own} of them lrpc's own)")


def distinct_exact(ops: dict[str, str]) -> int:
    """ONNX ops verified exact, by their own node test or their expanded body, with neither wrong nor crashing."""
    by_base = collections.defaultdict(set)
    for op, status in ops.items():
        by_base[op.removesuffix(" (expanded)")].add(status)
    return sum(1 for statuses in by_base.values() if "exact" in statuses and not statuses & {"wrong", "crash"})


def report(outcomes: list[Outcome], out=sys.stdout) -> None:
    ops = per_op(outcomes)
    by_op = collections.defaultdict(list)
    for o in outcomes:
        by_op[o.op].append(o)
    for op, status in ops.items():
        cases = by_op[op]
        counts = collections.Counter(c.status for c in cases)
        print(f"{status:8s} {op:40s} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=out)
        for c in cases:
            if c.status in ("wrong", "crash", "refused") or c.attnlrp:
                print(f"           {c.case}: {c.status} {c.detail} {c.attnlrp}".rstrip()[:240], file=out)
    print(coverage_line(outcomes), file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print the per-op table (default)")
    parser.add_argument("-k", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    cases = [c for c in collect() if not args.k or args.k in c.name]
    outcomes = run_all(cases)
    report(outcomes)
    return 1 if any(failing(o) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
