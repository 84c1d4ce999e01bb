"""The AttnLRP rules the passes assign to single nodes (docs/design.md, "Relevance semantics").

A rule is `rule(n, g, **params)` with n the node's lrpc.context.Context and g the ĝ of its first output,
like an op's VJP (lrpc.ops); it returns one thunk (or None) per input, or a dict {tensor: thunk} when it
sends ĝ past its own inputs (an activation region to its input u, a linear layer's bias Add to the
layer's input). RULES maps each rule name (lrpc.plan.Rule) to its function and its row form (lrpc.rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lrpc import ops, rows
from lrpc.analysis import dequantized_once
from lrpc.gamma import linear_gamma
from lrpc.graph import same_dim
from lrpc.plan import Rule
from lrpc.vjp_common import stabilised
from lrpc.vjp_norms import divide_by_lp_norm, layer_norm_grad

ACTIVATION_EPS = 1e-10   # identity rule (Eq. 9): ĝ_u = ĝ_v ⊙ v / (u + ε·sign(u)), sign(0) = 1


def _exact(n, g):
    """The node's exact VJP (lrpc.ops)."""
    return ops.vjp(n.node)(n, g)


def _uniform(n, g):
    """Bilinear product of two relevance-carrying operands, uniform rule (Prop. 3.2/3.3): ½ of each VJP."""
    return _exact(n, n.b.Mul(g, n.b.f32(0.5)))


def _frozen(n, g, frozen: int):
    """One operand is a normalisation statistic (identity rule on it, Prop. 3.4): a constant for ĝ."""
    return tuple(None if i == frozen else t for i, t in enumerate(_exact(n, g)))


def _layer_norm_frozen_std(n, g):
    """LayerNormalization with σ frozen (Prop. 3.4): ĝ_x = (h − mean h)/σ, h = ĝ_y ⊙ w."""
    return (lambda: layer_norm_grad(n, g, frozen_std=True), None, None)


def _lp_norm_frozen(n, g):
    """LpNormalization with the norm frozen (Prop. 3.4): ĝ_x = ĝ_y / ‖x‖."""
    return (lambda: divide_by_lp_norm(n, g),)


def _identity_region(n, g, input: str):
    """Elementwise region u → v, identity rule (Eq. 9): ĝ_u = ĝ_v ⊙ v / (u + ε·sign(u)), sign(0) = 1.

    When the region ends in v = u ⊙ s (SiLU u·σ(u), GELU u·Φ(u), …), v/u is s itself: ĝ_u = ĝ_v ⊙ s is the
    rule without the division (R_u = u·ĝ_v·s = R_v exactly; it differs from the stabilised quotient only
    where |u| is within a few ε·2²⁴ of 0, by a relative ε/|u|), and it reads a tensor the forward made."""
    b, u = n.b, n.value(input)
    factor = _cofactor(n, u)
    if factor is not None:
        return {u: lambda: b.Mul(g, n.f32(factor))}
    return {u: lambda: b.Mul(g, b.Div(n.y(), stabilised(b, n.f32(u), ACTIVATION_EPS)))}


def _cofactor(n, u):
    """s when the region's output node is v = u ⊙ s (either operand order; u or an identical dequantization
    of it, lrpc.analysis.dequantized_once) and v is shaped like u."""
    node, v = n.node, n.raw_out(0)
    operands = [dequantized_once(x) for x in node.inputs]
    if node.op_type != "Mul" or u not in operands or u.shape is None or v.shape is None \
            or u.shape.rank() != v.shape.rank() or not all(map(same_dim, u.shape, v.shape)):
        return None
    return node.inputs[1] if operands[0] is u else node.inputs[0]


def _no_relevance(n, g):
    """CP-LRP: the tensor is treated as a constant; nothing flows into this node."""
    return ()


def _linear_epsilon(n, g, epsilon: float, layer: str):
    """ε-rule (Eq. 8): ĝ_x = Wᵀ (ĝ_z ⊙ z / (z + ε·sign z)), z the layer's output including its bias."""
    b, z = n.b, n.y()
    layer_node = n.view(layer)   # the node itself, or the MatMul before its bias Add
    scaled = b.Mul(g, b.Div(z, stabilised(b, z, epsilon)))
    return {layer_node.raw(0): _exact(layer_node, scaled)[0]}


@dataclass(frozen=True)
class LrpRule:
    apply: Callable                      # apply(n, g, **params)
    rows: Callable | None = None         # row form (lrpc.rows), None: the rule needs the whole ĝ


RULES: dict[str, LrpRule] = {
    Rule.UNIFORM: LrpRule(_uniform, rows.product),
    Rule.GATED: LrpRule(_frozen, rows.pointwise),   # CP-LRP gating product: the activation-side operand takes none
    Rule.FROZEN: LrpRule(_frozen, rows.pointwise),
    Rule.LAYERNORM_FROZEN_STD: LrpRule(_layer_norm_frozen_std, rows.normalisation),
    Rule.LPNORM_FROZEN_NORM: LrpRule(_lp_norm_frozen),
    Rule.IDENTITY: LrpRule(_identity_region, rows.identity_region),
    Rule.SOFTMAX: LrpRule(_exact, rows.softmax),     # Prop. 3.1: in Gradient×Input form the exact VJP
    Rule.NONE: LrpRule(_no_relevance),
    Rule.EPSILON: LrpRule(_linear_epsilon),
    Rule.GAMMA: LrpRule(linear_gamma),
}
