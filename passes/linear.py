"""Linear layers (MatMul / Gemm / Conv with constant weights): the ε-rule with ε → 0 is the exact VJP and
needs no record. With options, the explicit ε-rule (Eq. 8), ĝ_x = Wᵀ(ĝ_z ⊙ z / (z + E·sign z)), or the
generalised γ-rule (zennit's Gamma; lrpc/gamma.py), on layers whose node name matches `layers`.

z is the layer's pre-activation including its bias: when the exporter writes nn.Linear as MatMul then
Add(bias), the Add carries the rule and the MatMul is inside the layer.

A quantized model's layers get the rule on their dequantized weight (a DequantizeLinear of constants: QDQ,
and the decomposition of QLinearMatMul / QLinearConv / QGemm), the float layer the int8 one approximates.
An integer contraction of quantize_dynamic (MatMulInteger, ConvInteger and their fused forms) has no float
layer to take the rule, and is refused when selected rather than left silently without it.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from lrpc import ops
from lrpc.analysis import weight_is_known
from lrpc.errors import LrpcError
from lrpc.plan import Rule

from .dataflow import carrying_inputs, is_default_domain

NAME = "linear"
LINEAR_OPS = {"MatMul", "Gemm", "Conv"}


def bias_add(node: ir.Node, carrying: set[ir.Value]) -> ir.Node | None:
    """The Add of a constant bias that is the layer output's only consumer, if any."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1:
        return None
    consumer = uses[0][0]
    if consumer.op_type != "Add" or not is_default_domain(consumer):
        return None
    other = consumer.inputs[1 - uses[0][1]]
    return consumer if other not in carrying and weight_is_known(other) else None


def run(graph: ir.Graph, carrying: set[ir.Value], plan, preset, options) -> None:
    if options.epsilon is None and options.gamma_linear is None and options.gamma_conv is None:
        return
    selected = re.compile(options.rule_nodes) if options.rule_nodes else None
    for node in graph:
        if ops.is_quantized(node) and ops.is_kind(node, ops.LINEAR) and carrying_inputs(node, carrying) and \
                not (selected and not selected.search(node.name or "")):
            raise LrpcError(f"--epsilon / --gamma-* do not apply to integer layers (node '{node.name}', "
                            f"{node.op_type}, an integer contraction): quantize with quantize_static (QDQ or "
                            "QOperator), whose dequantized weights take the rule, restrict --rule-nodes, or drop "
                            "the option")
        if not (is_default_domain(node) and node.op_type in LINEAR_OPS) or node in plan.records:
            continue
        if len(node.inputs) < 2 or node.inputs[0] not in carrying or not weight_is_known(node.inputs[1]):
            continue
        if len(carrying_inputs(node, carrying)) != 1 or (selected and not selected.search(node.name or "")):
            continue
        gamma = options.gamma_conv if node.op_type == "Conv" else options.gamma_linear
        rule, params = (Rule.GAMMA, {"gamma": gamma}) if gamma is not None else \
            (Rule.EPSILON, {"epsilon": options.epsilon}) if options.epsilon is not None else (None, None)
        if rule is None:
            continue
        add = bias_add(node, carrying)
        if add is not None and add not in plan.records:
            plan.claim(add, rule, NAME, layer=node.name, **params)
            plan.claim(node, Rule.INSIDE, NAME, notes={"layer_output": add.outputs[0].name})
        else:
            plan.claim(node, rule, NAME, layer=node.name, **params)
