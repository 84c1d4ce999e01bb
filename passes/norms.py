"""Normalisations get the identity rule on their statistic (AttnLRP Prop. 3.4): the std / rms / norm is a
constant for relevance, which flows through the centring x − mean(x) and the affine part only.

Found by dataflow, not by op sequence: a Mul or Div whose operands a, b both carry relevance is a
normalisation when b is made, through elementwise ops only, from a reduction whose input is
elementwise-derived from the same tensors as a. That covers RMSNorm in every exported variant, a
hand-written LayerNorm, Gemma's (1 + w) scale, query/key norms and a final L2 normalisation, and leaves
mean pooling (Σ h·m / Σ m: the denominator carries nothing) linear. Probabilities renormalised over a
top-k selection (mixture-of-experts routing weights) are a softmax over the selected logits, not a norm.
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import ops
from lrpc.plan import Rule

from .dataflow import (carrying_inputs, elementwise, elementwise_ancestry, is_default_domain, stands_for,
                       walk_up_elementwise)

NAME = "norms"
# Normalisation ops with their own frozen-statistic rule (lrpc.rules.RULES). RMSNormalization is not one:
# it is decomposed into the RMSNorm chain before analysis (lrpc.ops, FUSED).
# (GroupNormalization / InstanceNormalization have no rule yet: the emitter reports them by name.)
NORM_OPS = {"LayerNormalization": Rule.LAYERNORM_FROZEN_STD, "LpNormalization": Rule.LPNORM_FROZEN_NORM}
PASS_THROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"}  # keep every value as it is


def statistic_reductions(b: ir.Value, carrying: set[ir.Value]) -> list[ir.Node] | None:
    """The reductions b is made from through elementwise ops only, or None if b is not such a statistic."""
    reductions = []
    for value in walk_up_elementwise(b, carrying):
        producer = value.producer()
        if ops.is_kind(producer, ops.REDUCTION):
            reductions.append(producer)
        elif not elementwise(producer) and stands_for(value) is None:   # (a fused op: its decomposition is walked)
            return None  # a non-elementwise op on the way: b is not a pure statistic
    return reductions or None


def check_statistic(node: ir.Node, index: int, carrying: set[ir.Value]) -> str | None:
    """Why operand `index` of `node` is not a normalisation statistic (None when it is one)."""
    a, b = node.inputs[1 - index], node.inputs[index]
    reductions = statistic_reductions(b, carrying)
    if reductions is None:
        return "the operand is not made from a reduction through elementwise ops only"
    a_side = elementwise_ancestry(a, carrying)
    for reduction in reductions:
        if elementwise_ancestry(reduction.inputs[0], carrying) & a_side:
            if selected_probabilities(reduction):
                return ("probabilities divided by their sum (top-k routing weights): a softmax over the "
                        "selected logits, whose rule is its exact VJP")
            return None
    return "the reduction's input does not share elementwise ancestry with the other operand"


def selected_probabilities(reduction: ir.Node) -> bool:
    """Is `reduction` a ReduceSum of a Softmax's outputs, possibly a TopK selection of them (through casts and
    reshapes)? Dividing those by their sum (mixture-of-experts weights renormalised over the chosen experts)
    is exp(lᵢ) / Σ_chosen exp(lⱼ), itself a softmax, not a normalisation layer."""
    if reduction.op_type != "ReduceSum":
        return False
    value = reduction.inputs[0]
    while (producer := value.producer()) is not None:
        if producer.op_type == "Softmax":
            return True
        if not ((producer.op_type == "TopK" and value is producer.outputs[0]) or producer.op_type in PASS_THROUGH):
            return False
        value = producer.inputs[0]
    return False


def run(graph: ir.Graph, carrying: set[ir.Value], plan, preset, options) -> None:
    for node in graph:
        if not is_default_domain(node):
            continue
        if node.op_type in NORM_OPS and node.inputs[0] in carrying:
            plan.claim(node, NORM_OPS[node.op_type], NAME)
        elif node.op_type in ("Mul", "Div") and len(carrying_inputs(node, carrying)) == 2:
            candidates = (1,) if node.op_type == "Div" else (1, 0)
            for index in candidates:
                if check_statistic(node, index, carrying) is None:
                    plan.claim(node, Rule.FROZEN, NAME, notes={"statistic": node.inputs[index].name}, frozen=index)
                    break
