"""Products of two relevance-carrying operands (Q·Kᵀ, A·V, gate ⊙ up) get the uniform rule (AttnLRP
Prop. 3.2, 3.3): each operand receives ½ of its exact VJP. Under CP-LRP the operand of a gating product
that passes through the nonlinear activation takes none, and the other takes all.

A mixture-of-experts layer needs nothing of its own: the routing weight (a TopK's selected values) times
an expert's output is such a product; its row notes how many experts the TopK chooses from."""

from __future__ import annotations

import onnx_ir as ir

from lrpc.plan import Rule

from .dataflow import RESHAPES, carrying_inputs, elementwise, is_default_domain, live_values, single_path_source

NAME = "bilinear"
PRODUCTS = {"MatMul", "Mul", "Einsum"}


def activation_outputs(plan) -> set[str]:
    return {n.outputs[0].name for n, r in plan.records.items() if r.rule == Rule.IDENTITY}


def _last_dim(value: ir.Value):
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else "?"


def routing_note(node: ir.Node, carrying: set[ir.Value]) -> dict:
    """{"routing": "top-k of E experts"} when an operand is made, through elementwise and reshaping ops,
    from a TopK's values (a mixture-of-experts routing weight), else {}."""
    stack, seen = list(node.inputs), set()
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or value in seen:
            continue
        seen.add(value)
        if producer.op_type == "TopK" and value is producer.outputs[0]:
            return {"routing": f"top-{_last_dim(value)} of {_last_dim(producer.inputs[0])} experts"}
        if elementwise(producer) or producer.op_type in RESHAPES:
            stack.extend(carrying_inputs(producer, carrying))
    return {}


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
            plan.claim(node, Rule.UNIFORM, NAME, notes=routing_note(node, carrying))
