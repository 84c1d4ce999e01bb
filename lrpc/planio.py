"""Plans as rows: printing (`lrpc plan`), saving as JSON (golden plans), and structural diffs (`lrpc diff`).

Node names differ between exports, so a row's identity for diffing is its structure — op type, rule,
rule arguments that are not tensor names, and what the pass found (region size, statistic op) — and
rows are aligned in graph order with difflib, the way `diff` aligns lines.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.plan import Plan

CATEGORY = {"frozen": "norm", "layernorm-frozen-std": "norm", "rmsnorm-frozen-rms": "norm",
            "lpnorm-frozen-norm": "norm", "groupnorm-frozen-std": "norm", "identity": "activation",
            "softmax": "softmax", "none": "softmax (no relevance)", "uniform": "bilinear",
            "gated": "bilinear (gated)", "epsilon": "linear", "gamma": "linear"}
PLAN_FORMAT = "lrpc-plan/1"


def plan_rows(plan: Plan, graph: ir.Graph) -> list[dict]:
    rows = []
    for node in graph:
        record = plan.get(node)
        if record is None or record.rule == "inside":
            continue
        structure = {"op": node.op_type, "rule": record.rule,
                     "params": {k: v for k, v in record.params.items() if k != "input"}}
        if record.rule == "identity":
            structure["region_ops"] = record.notes.get("ops")
        if record.rule == "frozen":
            stat = node.inputs[record.params["frozen"]].producer()
            structure["statistic_op"] = stat.op_type if stat is not None else None
        rows.append({"node": node.name, "claimed_by": record.claimed_by, **structure,
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
    keep = {k: row.get(k) for k in ("op", "rule", "params", "region_ops", "statistic_op")}
    return json.dumps(keep, sort_keys=True)


def diff(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> list[str]:
    """Readable differences between two plans; empty when their rule assignments agree structurally."""
    ka, kb = [structure_key(r) for r in a["rows"]], [structure_key(r) for r in b["rows"]]
    out = []
    if a["preset"] != b["preset"]:
        out.append(f"preset: {name_a} {a['preset']} vs {name_b} {b['preset']}")
    describe = lambda r: f"{r['node']} ({r['op']} → {r['rule']}" + (
        f", {r['region_ops']} ops" if r.get("region_ops") else "") + ")"
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ka, b=kb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        for r in a["rows"][i1:i2]:
            out.append(f"- {name_a}: {describe(r)}")
        for r in b["rows"][j1:j2]:
            out.append(f"+ {name_b}: {describe(r)}")
    if a["summary"] != b["summary"]:
        out.append(f"summary: {name_a} {a['summary']} vs {name_b} {b['summary']}")
    return out
