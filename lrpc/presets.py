"""Presets as data (docs/design.md, "Pipeline"): which rule-assignment passes run, in the fixed order, and
with which switches. A pass reads its switches from the Preset it is given, never the preset's name.

Adding a preset: one row of TABLE (a new switch: a field of Preset, read by the pass it concerns).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from lrpc import passes, validate
from lrpc.analysis import relevance_carrying
from lrpc.errors import LrpcError
from lrpc.plan import Plan


@dataclass(frozen=True)
class Preset:
    name: str
    passes: tuple = passes.ORDER      # run in this order; a node claimed by an earlier pass is not re-claimed
    cut_softmax: bool = False         # softmax pass: no relevance flows into a softmax (its output is a constant)
    gated_products: bool = False      # bilinear pass: a gating product's activation-side operand takes none


TABLE = {p.name: p for p in (
    Preset("attnlrp"),                                               # AttnLRP (Achtibat et al. 2024)
    Preset("cp-lrp", cut_softmax=True, gated_products=True),         # CP-LRP (Ali et al. 2022)
    Preset("gxi", passes=()),                                        # Input×Gradient: every node its exact VJP
)}
PRESETS = tuple(TABLE)   # the preset names, for the command line and the API


@dataclass(frozen=True)
class Options:
    """Rule options of the linear pass; `rule_nodes` is a regex over node names selecting where they apply."""

    epsilon: float | None = None
    gamma_linear: float | None = None
    gamma_conv: float | None = None
    rule_nodes: str | None = None

    def __post_init__(self):
        validate.rule_options(self.epsilon, self.gamma_linear, self.gamma_conv, self.rule_nodes)


def get(name: str) -> Preset:
    if name not in TABLE:
        raise LrpcError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return TABLE[name]


def assign_rules(graph: ir.Graph, sources: set[ir.Value], preset: str,
                 options: Options = Options()) -> tuple[Plan, set[ir.Value]]:
    """Run the preset's passes (norms → activations → softmax → bilinear → linear) into one plan.

    Returns the plan and the relevance-carrying tensors, recomputed whenever a pass declares a
    tensor constant (CP-LRP's softmax), so later passes see what really carries relevance."""
    chosen = get(preset)
    plan = Plan(preset)
    carrying = relevance_carrying(graph, sources)
    for run_pass in chosen.passes:
        cut_before = len(plan.cut)
        run_pass(graph, carrying, plan, chosen, options)
        if len(plan.cut) != cut_before:
            carrying = relevance_carrying(graph, sources, plan.cut)
    validate.rule_options_took_effect(plan, options)
    return plan, carrying
