"""Linear layers (MatMul / Gemm / Conv with constant weights): the ε-rule with ε → 0 is the exact VJP and
needs no record. With options, the explicit ε-rule (Eq. 8), ĝ_x = Wᵀ(ĝ_z ⊙ z / (z + E·sign z)), or the
γ-rule, ĝ_x = W_γᵀ(ĝ_z ⊙ z / stab(z_γ)) with W_γ = W + γ·W⁺, on layers whose node name matches `layers`."""

from __future__ import annotations

import re

import onnx_ir as ir

from lrpc.analysis import const_array_is_known

from .dataflow import carrying_inputs, is_default_domain

NAME = "linear"
LINEAR_OPS = {"MatMul", "Gemm", "Conv"}


def run(graph: ir.Graph, carrying: set[ir.Value], plan, options) -> None:
    if options.epsilon is None and options.gamma_linear is None and options.gamma_conv is None:
        return
    selected = re.compile(options.layers) if options.layers else None
    for node in graph:
        if not (is_default_domain(node) and node.op_type in LINEAR_OPS) or node in plan.records:
            continue
        if len(node.inputs) < 2 or node.inputs[0] not in carrying or not const_array_is_known(node.inputs[1]):
            continue
        if len(carrying_inputs(node, carrying)) != 1 or (selected and not selected.search(node.name or "")):
            continue
        gamma = options.gamma_conv if node.op_type == "Conv" else options.gamma_linear
        if gamma is not None:
            plan.claim(node, "gamma", NAME, gamma=gamma)
        elif options.epsilon is not None:
            plan.claim(node, "epsilon", NAME, epsilon=options.epsilon)
