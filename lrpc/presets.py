"""Presets: which rule-assignment passes run, in DESIGN.md's fixed order, and with what options."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lrpc.analysis import relevance_carrying
from lrpc.errors import LrpcError
from lrpc.plan import Plan

PRESETS = ("attnlrp", "cp-lrp", "gxi")


@dataclass(frozen=True)
class Options:
    """Rule options of the linear pass; `layers` is a regex over node names selecting where they apply."""

    epsilon: float | None = None
    gamma_linear: float | None = None
    gamma_conv: float | None = None
    layers: str | None = None
    extra: dict = field(default_factory=dict)


def assign_rules(graph: ir.Graph, sources: set[ir.Value], preset: str,
                 options: Options = Options()) -> tuple[Plan, set[ir.Value]]:
    """Run the preset's passes (norms → activations → softmax → bilinear → linear) into one plan.

    Returns the plan and the relevance-carrying tensors, recomputed whenever a pass declares a
    tensor constant (CP-LRP's softmax), so later passes see what really carries relevance."""
    if preset not in PRESETS:
        raise LrpcError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    plan = Plan(preset)
    carrying = relevance_carrying(graph, sources)
    if preset == "gxi":
        return plan, carrying
    from lrpc import passes  # the passes live in passes/, installed as lrpc.passes
    for run_pass in passes.ORDER:
        cut_before = len(plan.cut)
        run_pass(graph, carrying, plan, options)
        if len(plan.cut) != cut_before:
            carrying = relevance_carrying(graph, sources, plan.cut)
    return plan, carrying
