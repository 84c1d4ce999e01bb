"""Products of two relevance-carrying operands (Q·Kᵀ, A·V, gate ⊙ up) get the uniform rule (AttnLRP
Prop. 3.2, 3.3): each operand receives ½ of its exact VJP. Under CP-LRP the operand of a gating product
that passes through the nonlinear activation takes none, and the other takes all."""

from __future__ import annotations

import onnx_ir as ir

from lrpc.plan import Rule

from .dataflow import carrying_inputs, is_default_domain, live_values, single_path_source

NAME = "bilinear"
PRODUCTS = {"MatMul", "Mul", "Einsum"}


def activation_outputs(plan) -> set[str]:
    return {n.outputs[0].name for n, r in plan.records.items() if r.rule == Rule.IDENTITY}


def run(graph: ir.Graph, carrying: set[ir.Value], plan, preset, options) -> None:
    gated = activation_outputs(plan) if preset.gated_products else set()
    live = live_values(graph, carrying, plan)  # products inside a frozen statistic get no relevance
    for node in graph:
        if not (is_default_domain(node) and node.op_type in PRODUCTS) or node in plan.records:
            continue
        if len(node.inputs) != 2 or len(carrying_inputs(node, carrying)) != 2 or node.outputs[0] not in live:
            continue
        activated = [i for i, v in enumerate(node.inputs)
                     if any(u.name in gated for u in single_path_source(v, carrying))]
        if len(activated) == 1:
            plan.claim(node, Rule.GATED, NAME, frozen=activated[0])
        else:
            plan.claim(node, Rule.UNIFORM, NAME)
