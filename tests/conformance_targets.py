"""The K axis through every op: ONNX's node tests (tests/conformance.py) compiled with `targets=K` (issue 14).

Each case the conformance harness attributes (a float input the finite differences see moving) is wrapped
with COLUMNS = 3 outputs s_c = Σ w_c ⊙ y (different random weights w_c per column, so the targets' ĝ differ
in every element, not only by a factor), and compiled three times: the single-target explainer, `targets="dynamic"` (run with K = 3 and K = 1)
and `targets=3`. Each row k of a K run must equal the single-target explainer
run for that row's target (≤ 1e-5 relative, row by row; K = 1 ≤ 1e-6). The single-target explainer is the
oracle: the conformance suite checks it against finite differences. The K rows are seeded differently and
out of order ([2, 0, 1] dynamic, [1, 2, 0] for K = 3), so a VJP that mixes, sums or drops the leading K
axis of ĝ, or lines it up with a data axis, fails. Cases run with `gxi`, and with `attnlrp` too where its
passes claim a node. Explainers are cached beside the conformance ones (keyed by lrpc's sources).

    python tests/conformance_targets.py              # every case: the per-op table of what differs
    python tests/conformance_targets.py -k Softmax   # only cases whose name contains Softmax
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pickle
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import conformance
from conformance import SCALAR
from oracles import relative_error

COLUMNS = 3
# (how the explainer is compiled, the targets of its run's single row): K = 3 dynamic and static, K = 1 both
RUNS = (("dynamic", [2, 0, 1]), ("dynamic", [1]), (3, [1, 2, 0]))
STATUSES = ("equal", "differs", "crash", "refused", "n/a")


@dataclass
class KOutcome:
    case: str
    op: str
    status: str
    detail: str = ""


def wrap_columns(case: conformance.Case):
    """The conformance wrapper with COLUMNS - 1 more weighted sums concatenated to its [1, 1] output."""
    wrapped = conformance.wrap(case)
    if wrapped is None:
        return None
    model, floats = wrapped
    graph = model.graph
    rng = np.random.default_rng(zlib.crc32(case.name.encode()) + 1)
    sums = [f"{SCALAR}_column0"]
    graph.node[-1].output[0] = sums[0]   # the wrapper's last node, the Reshape to [1, 1], feeds a Concat now
    for c in range(1, COLUMNS):
        terms = []
        for k, name in enumerate(floats):
            weight, term = f"{SCALAR}_w{k}_c{c}", f"{SCALAR}_t{k}_c{c}"
            values = rng.uniform(0.5, 1.5, case.outputs[name].shape).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(values, weight))
            graph.node.append(helper.make_node("Mul", [name, weight], [term + "_p"]))
            graph.node.append(helper.make_node("ReduceSum", [term + "_p"], [term], keepdims=0))
            terms.append(term)
        graph.node.append(helper.make_node("Sum", terms, [f"{SCALAR}_sum_c{c}"]))
        sums.append(f"{SCALAR}_column{c}")
        graph.node.append(helper.make_node("Reshape", [f"{SCALAR}_sum_c{c}", f"{SCALAR}_shape"], [sums[-1]]))
    graph.node.append(helper.make_node("Concat", sums, [SCALAR], axis=1))
    graph.output[-1].CopyFrom(helper.make_tensor_value_info(SCALAR, TensorProto.FLOAT, [1, COLUMNS]))
    return model


def attributed(case: conformance.Case, model) -> list[str]:
    """The float inputs the conformance harness attributes for this case ([] when it does not apply)."""
    measured = conformance.measure(case, model)
    if measured[0] == "n/a":
        return []
    _, _, oracle, estimates = measured
    tiny = 1e-7 * (1 + abs(oracle["s0"]))
    moving = [k for k, es in estimates.items() if any(e is not None and abs(e[0]) > tiny for _, e in es)]
    return moving


def compile_cached(model, attribute: list[str], preset: str, targets) -> tuple[str, object, int | None]:
    """(status, explainer bytes or message, nodes the attnlrp passes claim), cached by sources and model."""
    import lrpc
    import onnx_ir as ir
    from lrpc import compiler
    if conformance._SOURCES is None:
        conformance._SOURCES = conformance._sources_key()
    key = hashlib.sha256(conformance._SOURCES + model.SerializeToString()
                         + f"{','.join(attribute)}|{preset}|{targets}|{COLUMNS}".encode())
    path = conformance._cache_dir() / f"k-{key.hexdigest()[:24]}.pickle"
    if path.exists():
        return pickle.loads(path.read_bytes())
    claims = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            canonical = compiler.load(model)
            if targets is None and preset == "gxi":
                claims = len(compiler.analyse_and_plan(canonical, "attnlrp", attribute)[2].records)
            explainer = compiler.build_explainer(canonical, preset=preset, attribute=attribute, output_name=SCALAR,
                                                 targets=targets)
            result = ("ok", ir.to_proto(explainer).SerializeToString(), claims)
        except lrpc.LrpcError as exc:
            result = ("refused", str(exc).splitlines()[0][:300], claims)
        except Exception as exc:  # noqa: BLE001  (a compiler traceback is a crash)
            result = ("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300], claims)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)
    return result


def _relevance(explainer: bytes, inputs: dict, target: list[int]) -> dict[str, np.ndarray]:
    """relevance.<name> of one run; `target` is one int for a single-target explainer, else the K row."""
    session = conformance._session(explainer)
    names = [i.name for i in session.get_inputs()]
    feed = {**inputs, "lrp_target": np.array(target, np.int64)}
    outs = session.run(None, {k: feed[k] for k in names})
    return {o.name.removeprefix("relevance."): v for o, v in zip(session.get_outputs(), outs)
            if o.name.startswith("relevance.")}


def _check_preset(case, model, attribute, preset) -> tuple[str, str]:
    single = compile_cached(model, attribute, preset, None)
    if single[0] != "ok":
        return "n/a", f"{preset} single-target explainer {single[0]}: {single[1]}"
    try:
        reference = [_relevance(single[1], case.inputs, [c]) for c in range(COLUMNS)]
    except Exception as exc:  # noqa: BLE001  (the conformance suite reports the single-target explainer)
        return "n/a", f"{preset} single-target explainer fails: {type(exc).__name__}"
    for targets, row in RUNS:
        status, result, _ = compile_cached(model, attribute, preset, targets)
        where = f"{preset} targets={targets} K={len(row)}"
        if status == "refused":
            return "refused", f"{where}: {result}"
        if status == "error":
            return "crash", f"{where}: compile raised {result}"
        try:
            got = _relevance(result, case.inputs, [row])
        except Exception as exc:  # noqa: BLE001
            return "crash", f"{where}: onnxruntime: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        tolerance = 1e-6 if len(row) == 1 else 1e-5
        for name in attribute:
            ref = reference[0][name]
            axis = 1 if ref.ndim else 0   # K after the first axis (the contract's batch)
            if got[name].shape != ref.shape[:1] + (len(row),) + ref.shape[1:]:
                return "differs", f"{where}: relevance.{name} shape {got[name].shape}, single {ref.shape}"
            for k, target in enumerate(row):
                expected = reference[target][name]
                actual = np.take(got[name], k, axis=axis)
                error = relative_error(actual.astype(np.float64), expected.astype(np.float64))
                if not error <= tolerance:
                    return "differs", f"{where}: relevance.{name} row {k} (target {target}) off by {error:.3g}"
    return "equal", ""


def run_case(case: conformance.Case) -> KOutcome:
    model = wrap_columns(case)
    attribute = attributed(case, conformance.wrap(case)[0]) if model is not None else []
    if not attribute:
        return KOutcome(case.name, case.op, "n/a", "no attributed input")
    status, detail = _check_preset(case, model, attribute, "gxi")
    if status == "equal" and (compile_cached(model, attribute, "gxi", None)[2] or 0) > 0:
        status, detail = _check_preset(case, model, attribute, "attnlrp")
    return KOutcome(case.name, case.op, status, detail)


def report(outcomes: list[KOutcome], out=sys.stdout) -> None:
    by_op = collections.defaultdict(list)
    for o in outcomes:
        by_op[o.op].append(o)
    for op, cases in sorted(by_op.items()):
        counts = collections.Counter(c.status for c in cases)
        print(f"{op:40s} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=out)
        for c in cases:
            if c.status in ("differs", "crash", "refused"):
                print(f"    {c.case}: {c.status} {c.detail}"[:260], file=out)
    cases = collections.Counter(o.status for o in outcomes)
    ops = {op for op, cs in by_op.items() if any(c.status == "equal" for c in cs)}
    print(f"K sweep: {len(ops)} ops with a case whose K rows equal the single-target explainer; cases: "
          + ", ".join(f"{cases[s]} {s}" for s in STATUSES), file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="only cases whose name contains this")
    parser.add_argument("-v", action="store_true", help="print each failing case as it is found")
    args = parser.parse_args(argv)
    cases = [c for c in conformance.collect() if not args.k or args.k in c.name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = []
        for case in cases:
            outcomes.append(run_case(case))
            if args.v and outcomes[-1].status in ("differs", "crash", "refused"):
                print(f"{case.name}: {outcomes[-1].status} {outcomes[-1].detail}"[:300], flush=True)
    report(outcomes)
    return 1 if any(o.status in ("differs", "crash") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
