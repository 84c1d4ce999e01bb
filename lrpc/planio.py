"""Plans as rows: printing (`lrpc plan`), saving as JSON (golden plans), and structural diffs (`lrpc diff`).

Node names, op counts and topological orders differ between exporters, so a row's identity for diffing
is semantic — its rule, the rule's arguments that are not tensor names, what feeds a region and which
reduction makes a frozen statistic — and rows are put in a canonical order before difflib aligns them:
by rule depth (how many rule-bearing nodes lie on the longest path above the node), then by rule.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.plan import Plan, Rule

CATEGORY = {Rule.FROZEN: "norm", Rule.LAYERNORM_FROZEN_STD: "norm", Rule.LPNORM_FROZEN_NORM: "norm",
            Rule.IDENTITY: "activation", Rule.SOFTMAX: "softmax", Rule.NONE: "softmax (no relevance)",
            Rule.UNIFORM: "bilinear", Rule.GATED: "bilinear (gated)", Rule.EPSILON: "linear", Rule.GAMMA: "linear"}
PLAN_FORMAT = "lrpc-plan/2"


NAME_PARAMS = {"input", "layer"}  # rule arguments that are tensor/node names, not structure


def _rule_depths(plan: Plan, graph: ir.Graph) -> dict[ir.Node, int]:
    """Rule-bearing nodes on the longest path above each node (its own rule not counted)."""
    value_depth: dict[ir.Value, int] = {}
    depths = {}
    for node in graph:
        depth = max((value_depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        depths[node] = depth
        record = plan.get(node)
        out = depth + (1 if record is not None and record.rule != Rule.INSIDE else 0)
        for v in node.outputs:
            value_depth[v] = out
    return depths


def _statistic_reduction(node: ir.Node, index: int) -> str | None:
    """The reduction op a frozen statistic is made from (ReduceMean for RMS, ReduceL2 for L2, …)."""
    stack, seen = [node.inputs[index]], set()
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or producer in seen:
            continue
        seen.add(producer)
        if producer.op_type.startswith("Reduce"):
            return producer.op_type
        stack.extend(producer.inputs)
    return None


def plan_rows(plan: Plan, graph: ir.Graph) -> list[dict]:
    depths = _rule_depths(plan, graph)
    order = {node: i for i, node in enumerate(graph)}
    producer_op = {o.name: n.op_type for n in graph for o in n.outputs}
    rows = []
    for node in sorted((n for n in graph if plan.get(n) is not None and plan.get(n).rule != Rule.INSIDE),
                       key=lambda n: (depths[n], plan.get(n).rule, order[n])):
        record = plan.get(node)
        structure = {"rule": record.rule, "depth": depths[node],
                     "params": {k: v for k, v in record.params.items() if k not in NAME_PARAMS}}
        if record.rule == Rule.IDENTITY:
            structure["region_input_op"] = producer_op.get(record.params["input"], "input")
        if record.rule == Rule.FROZEN:
            structure["statistic"] = _statistic_reduction(node, record.params["frozen"])
        rows.append({"node": node.name, "op": node.op_type, "claimed_by": record.claimed_by, **structure,
                     "notes": record.notes, "input": record.params.get("input")})
    return rows


def summary(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(CATEGORY.get(r["rule"], r["rule"]) for r in rows).items()))


def to_json(plan: Plan, graph: ir.Graph, source: str = "") -> dict:
    rows = plan_rows(plan, graph)
    return {"format": PLAN_FORMAT, "preset": plan.preset, "source": source, "summary": summary(rows), "rows": rows}


def to_text(doc: dict) -> str:
    rows = doc["rows"]
    lines = [f"plan for {doc.get('source') or 'model'} (preset {doc['preset']}): {len(rows)} rule-bearing nodes"]
    width = max([len(r["node"]) for r in rows] + [4])
    lines.append(f"{'node':<{width}}  {'op':<20} {'rule':<22} {'pass':<12} details")
    for r in rows:
        details = {**r["params"], **{k: v for k, v in r["notes"].items()}}
        if r.get("input"):
            details["from"] = r["input"]
        text = ", ".join(f"{k}={v}" for k, v in details.items())
        lines.append(f"{r['node']:<{width}}  {r['op']:<20} {r['rule']:<22} {r['claimed_by']:<12} {text}")
    lines.append("summary: " + ", ".join(f"{n} {k}" for k, n in doc["summary"].items()))
    if "components" in doc:   # what --components resolves to (lrpc.components)
        lines.append("components:")
        lines += [f"  {c['component']:<14} {c['units']:>6} units  {c['tensor']}  {c['shape']}" for c in doc["components"]]
    return "\n".join(lines)


def read_plan_json(path: Path) -> dict | None:
    """A saved plan, or None when the file is not one (then it is a model)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise LrpcError(f"{path} is JSON but not an lrpc plan (expected format {PLAN_FORMAT}); "
                        "make one with `lrpc plan MODEL --format json`")
    return doc


def structure_key(row: dict) -> str:
    keep = {k: row.get(k) for k in ("rule", "depth", "params", "region_input_op", "statistic")}
    return json.dumps(keep, sort_keys=True)


def diff(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> list[str]:
    """Readable differences between two plans; empty when their rule assignments agree structurally."""
    ka, kb = [structure_key(r) for r in a["rows"]], [structure_key(r) for r in b["rows"]]
    out = []
    if a["preset"] != b["preset"]:
        out.append(f"preset: {name_a} {a['preset']} vs {name_b} {b['preset']}")
    describe = lambda r: f"{r['node']} ({r['op']} → {r['rule']}, depth {r['depth']}" + (
        f", region from {r['region_input_op']}" if r.get("region_input_op") else "") + (
        f", statistic from {r['statistic']}" if r.get("statistic") else "") + ")"
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ka, b=kb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        for r in a["rows"][i1:i2]:
            out.append(f"- {name_a}: {describe(r)}")
        for r in b["rows"][j1:j2]:
            out.append(f"+ {name_b}: {describe(r)}")
    if a["summary"] != b["summary"]:
        out.append(f"summary: {name_a} {a['summary']} vs {name_b} {b['summary']}")
    units = lambda doc: {c["component"]: c["units"] for c in doc.get("components", [])}  # noqa: E731
    if units(a) != units(b):
        out.append(f"components: {name_a} {units(a)} vs {name_b} {units(b)}")
    return out
