"""The generalised LRP γ-rule on linear layers (MatMul / Gemm with a constant weight, Conv), as zennit's
`Gamma(gamma, stabilizer=1e-6)` defines it (Montavon et al. 2019; Andéol et al. 2021).

For one output z = W x + b of the layer, with x = x⁺ + x⁻ (x⁺ = max(x, 0), x⁻ = min(x, 0)),
W⁺ = max(W, 0), W⁻ = min(W, 0), and the two weight variants W↑ = W + γW⁺, W↓ = W + γW⁻
(biases b↑ = b + γb⁺, b↓ = b + γb⁻):

    where z > 0:  R_x = x⁺ ⊙ W↑ᵀ s⁺ + x⁻ ⊙ W↓ᵀ s⁺,   s⁺ = R_z / stab(W↑x⁺ + b↑ + W↓x⁻)
    where z < 0:  R_x = x⁺ ⊙ W↓ᵀ s⁻ + x⁻ ⊙ W↑ᵀ s⁻,   s⁻ = R_z / stab(W↓x⁺ + b↓ + W↑x⁻)
    where z = 0:  nothing flows,

stab(d) = d + 1e-6·sign(d), sign(0) = 1. Positive outputs share their relevance in proportion to the
contributions that push z up (boosted by γ), negative outputs in proportion to those that push it down.
The textbook form W + γW⁺ is the z > 0 case with x ≥ 0 only.

lrpc keeps relevance as R = value ⊙ ĝ, so with R_z = z ⊙ ĝ_z the rule returns
ĝ_x = [x > 0]·(W↑ᵀs⁺ + W↓ᵀs⁻) + [x < 0]·(W↓ᵀs⁺ + W↑ᵀs⁻): four forward products with the folded weights
W↑, W↓ (two per denominator) and four transposed products back, whatever the layer's op and attributes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc import ops
from lrpc.errors import LrpcError
from lrpc.graph import weight_array
from lrpc.vjp_common import stabilised

STABILISER = 1e-6   # zennit's Gamma default


def linear_gamma(n, g, gamma: float, layer: str):
    """Rule record "gamma" on a linear layer (or on the bias Add after its MatMul): see the module doc."""
    b = n.b
    layer_node = n.view(layer)   # the node itself, or the MatMul before its bias Add
    node = layer_node.node
    after_bias_add = n.node is not node

    made = {}

    def folded(value, sign):
        """value + γ·value⁺ (sign +1) or value + γ·value⁻ (sign −1), as a float32 initializer (made once:
        each weight variant serves two forward products and two transposed ones)."""
        if (value, sign) not in made:
            array = weight_array(value)   # (a quantized model's: its dequantized float)
            if array is None:
                raise LrpcError(f"node '{node.name}' ({node.op_type}): the γ-rule needs constant weights")
            array = array.astype(np.float32)
            part = np.maximum(array, 0) if sign > 0 else np.minimum(array, 0)
            made[value, sign] = b.const(array + np.float32(gamma) * part, hint="gamma_weight")
        return made[value, sign]

    x = layer_node.x(0)
    x_pos, x_neg = _like(b.Relu(x), x), _like(b.Min(x, b.f32(0.0)), x)
    attrs = {k: a.value for k, a in node.attributes.items()}
    own_bias = node.inputs[2] if len(node.inputs) > 2 else None      # Gemm C / Conv B
    add_bias = (n.raw(1) if n.raw(0) is node.outputs[0] else n.raw(0)) if after_bias_add else None

    def product(x_part, sign, with_bias):
        """The layer on x_part with W↑ (sign +1) or W↓ (−1), its biases folded the same way or left out:
        (the node applying the weight, its output with the bias added)."""
        inputs = [x_part, folded(node.inputs[1], sign)]
        if own_bias is not None and with_bias:
            inputs.append(folded(own_bias, sign))
        out = _like(b.op(node.op_type, *inputs, **attrs), node.outputs[0])
        return out.producer(), b.Add(out, folded(add_bias, sign)) if add_bias is not None and with_bias else out

    up_node, up_pos = product(x_pos, +1, True)
    down_node, down_pos = product(x_pos, -1, True)
    z = n.y()
    relevance = b.Mul(g, z)
    s_pos = b.Mul(b.Cast(b.Greater(z, b.f32(0.0)), to=1),
                  b.Div(relevance, stabilised(b, b.Add(up_pos, product(x_neg, -1, False)[1]), STABILISER)))
    s_neg = b.Mul(b.Cast(b.Less(z, b.f32(0.0)), to=1),
                  b.Div(relevance, stabilised(b, b.Add(down_pos, product(x_neg, +1, False)[1]), STABILISER)))

    # the transposed products: the layer op's VJP (for its input) taken at the nodes that apply W↑ and W↓
    vjp = ops.vjp(node)
    back_up = lambda s: vjp(n.view(up_node), s)[0]()      # noqa: E731  W↑ᵀ s
    back_down = lambda s: vjp(n.view(down_node), s)[0]()  # noqa: E731  W↓ᵀ s

    def grad():
        positive = b.Mul(b.Cast(b.Greater(x, b.f32(0.0)), to=1), b.Add(back_up(s_pos), back_down(s_neg)))
        negative = b.Mul(b.Cast(b.Less(x, b.f32(0.0)), to=1), b.Add(back_down(s_pos), back_up(s_neg)))
        return b.Add(positive, negative)
    return {layer_node.raw(0): grad}


def _like(value: ir.Value, template: ir.Value) -> ir.Value:
    """Give a new float32 value the template's shape (the VJPs read ranks and static dims from it)."""
    value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), template.shape
    return value

