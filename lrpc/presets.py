"""Presets: which rule-assignment passes run, in DESIGN.md's fixed order, and with what options."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

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


def assign_rules(graph: ir.Graph, carrying: set[ir.Value], preset: str, options: Options = Options()) -> Plan:
    """Run the preset's passes (norms → activations → softmax → bilinear → linear) into one plan."""
    if preset not in PRESETS:
        raise LrpcError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    plan = Plan(preset)
    if preset == "gxi":
        return plan
    from lrpc import passes  # the passes live in passes/, installed as lrpc.passes
    for run_pass in passes.ORDER:
        run_pass(graph, carrying, plan, options)
    return plan
