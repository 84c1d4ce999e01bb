"""Softmax: under AttnLRP the softmax rule (Prop. 3.1), R_in,i = x_i (R_out,i − s_i Σ_j R_out,j), which is
the exact VJP in Gradient×Input form; under CP-LRP no relevance flows into it (its output is a constant)."""

from __future__ import annotations

import onnx_ir as ir

from lrpc.plan import Rule

from .dataflow import is_default_domain

NAME = "softmax"


def run(graph: ir.Graph, carrying: set[ir.Value], plan, preset, options) -> None:
    for node in graph:
        if is_default_domain(node) and node.op_type == "Softmax" and node.inputs[0] in carrying:
            if preset.cut_softmax:
                if plan.claim(node, Rule.NONE, NAME):
                    plan.cut.add(node.outputs[0])
            else:
                plan.claim(node, Rule.SOFTMAX, NAME)
