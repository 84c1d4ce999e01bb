"""Elementwise nonlinearities get the identity rule (AttnLRP Eq. 9) over their whole region u → v:
ĝ_u = ĝ_v ⊙ v / (u + ε·sign(u)); the ops inside get no rule of their own.

Regions come from dominators on the DAG of relevance-carrying tensors (docs/design.md, "Activation
regions"): start at u = N's input; climb u's dominator chain while the tensor climbed from is made by
an elementwise op; a dominator d is acceptable when its immediate post-dominator v is N's output or
after it and every op between d and v is elementwise. The region is (highest acceptable d, its v),
else (N's input, its post-dominator). So Gelu(MatMul + b) keeps the bias outside, SiLU x·σ(x) is
(x, the Mul) and GPT-2's tanh-GELU chain is (x, the final Mul).
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import ops
from lrpc.graph import DECOMPOSITION, is_float
from lrpc.plan import Rule

from .dataflow import SINK, CarryingDAG, elementwise, stands_for

NAME = "activations"


def region(dag: CarryingDAG, node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    start, out = dag.vertex(node.inputs[0]), node.outputs[0]
    if start not in dag.dag or out not in dag.dag:
        return None

    def acceptable(d):
        v = dag.ipdom.get(d)
        if v is None or v == SINK or dag.order[v] < dag.order[out] or not is_float(v):
            return None
        # (a fused node between is judged by its decomposition's nodes, which are between too)
        return v if all(elementwise(n) or DECOMPOSITION in n.meta for n in dag.between(d, v)) else None

    best, u = None, start
    while elementwise(u.producer()) or stands_for(u) is not None:   # (through a fused op's decomposition too)
        d = dag.idom.get(u)
        if d is None or not isinstance(d, ir.Value):
            break
        v = acceptable(d) if is_float(d) else None   # (a quantized tensor's values are codes, not what it stands for)
        if v is not None:
            best = (d, v)
        u = d
    if best is not None:
        return best
    v = dag.ipdom.get(start)
    return None if v is None or v == SINK else (start, v)


def run(graph: ir.Graph, carrying: set[ir.Value], plan, preset, options) -> None:
    dag = None
    for node in graph:
        if not (ops.is_kind(node, ops.NONLINEAR) and node.inputs[0] in carrying):
            continue
        if node in plan.records:
            continue  # already inside an earlier region (e.g. the Tanh of a GELU whose Erf came first)
        dag = dag or CarryingDAG(graph, carrying)
        found = region(dag, node)
        if found is None:
            continue
        u, v = found
        inner = dag.between(u, v) - {v.producer()}
        if any(n in plan.records for n in inner | {v.producer()}):
            continue
        plan.claim(v.producer(), Rule.IDENTITY, NAME, notes={"ops": len(inner) + 1}, input=u.name)
        for n in inner:
            plan.claim(n, Rule.INSIDE, NAME, notes={"region_output": v.name})
