"""Decompositions of fused norms and biased activations (see lrpc.decompose)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.fused_common import gelu, norm_axes, optional_input, require_unused, rms_norm
from lrpc.graph import attr


def bias_gelu(node, b, ctx):
    """com.microsoft BiasGelu / Gelu / FastGelu: Gelu(A + B) (erf; tanh form for FastGelu)."""
    x = node.inputs[0]
    bias = optional_input(node, 1)
    if bias is not None:
        x = b.Add(x, bias)
    return [gelu(b, x, "tanh" if node.op_type == "FastGelu" else "none", ctx.opset)]


def quick_gelu(node, b, ctx):
    """com.microsoft QuickGelu: x · Sigmoid(α·x), α = alpha (default 1.702)."""
    x = node.inputs[0]
    alpha = float(attr(node, "alpha", 1.702))
    z = x if alpha == 1.0 else b.Mul(x, b.scalar(alpha))
    return [b.Mul(x, b.Sigmoid(z))]


def bias_split_gelu(node, b, ctx):
    """com.microsoft BiasSplitGelu: h = X + bias; left, right = halves of h (last axis); left · Gelu(right)."""
    h = b.Add(node.inputs[0], node.inputs[1])
    left, right = b.Split(h, axis=-1, num_outputs=2, _outputs=2)
    return [b.Mul(left, gelu(b, right, "none", ctx.opset))]


def bias_add(node, b, ctx):
    """com.microsoft BiasAdd: X + bias + skip."""
    return [b.Add(b.Add(node.inputs[0], node.inputs[1]), node.inputs[2])]


def _skip_sum(node, b, bias_index):
    s = b.Add(node.inputs[0], node.inputs[1])     # onnxruntime: (input + skip) + bias
    bias = optional_input(node, bias_index)
    return s if bias is None else b.Add(s, bias)


def skip_layer_norm(node, b, ctx):
    """com.microsoft SkipLayerNormalization: s = input + skip (+ bias); LayerNormalization(s, γ, β);
    output 3 (input_skip_bias_sum) is s."""
    require_unused(node, (1, 2), ("mean", "inv_std_var"))
    s = _skip_sum(node, b, 4)
    beta = optional_input(node, 3)
    y = b.LayerNormalization(s, node.inputs[2], *([beta] if beta is not None else []), axis=-1,
                             epsilon=float(attr(node, "epsilon", 1e-12)))
    return [y, None, None, s]


def skip_simplified_layer_norm(node, b, ctx):
    """com.microsoft SkipSimplifiedLayerNormalization: s = input + skip (+ bias); RMSNorm(s)·γ; output 3 is s."""
    require_unused(node, (1, 2), ("mean", "inv_std_var"))
    s = _skip_sum(node, b, 3)
    y = rms_norm(b, s, node.inputs[2], float(attr(node, "epsilon", 1e-12)), b.i64([-1]), b.dtype)
    return [y, None, None, s]


def simplified_layer_norm(node, b, ctx):
    """SimplifiedLayerNormalization (onnxruntime, default domain) and ONNX RMSNormalization-23:
    x / sqrt(mean(x², axes [axis, rank)) + ε) · scale."""
    require_unused(node, (1,), ("inv_std_var",))
    x = node.inputs[0]
    axes = norm_axes(b, node, x, int(attr(node, "axis", -1)))
    return [rms_norm(b, x, node.inputs[1], float(attr(node, "epsilon", 1e-5)), axes, b.dtype)]


def embed_layer_norm(node, b, ctx):
    """com.microsoft EmbedLayerNormalization: s = word[ids] + pos[position_ids or 0..S-1] (+ segment[seg]);
    output = LayerNormalization(s, γ, β); mask_index = #(mask == 1) per row (int32, zeros without a mask);
    embedding_sum = s."""
    def value(i, indices=None):
        return node.inputs[i] if indices is None else b.Gather(node.inputs[i], indices)
    return embedding_layer_norm(node, b, value, optional_input(node, 8))


def embedding_layer_norm(node, b, value, position_ids=None):
    """EmbedLayerNormalization's computation (also QEmbedLayerNormalization's), its inputs at the same places:
    ids 0, segment ids 1, the word / position / segment tables 2 / 3 / 4, γ 5, β 6, mask 7. `value(i, indices)`
    is input i's float rows at `indices` (its float value without), so the quantized op dequantizes there."""
    ids, seg_ids, seg, mask = node.inputs[0], optional_input(node, 1), optional_input(node, 4), optional_input(node, 7)
    s = value(2, ids)
    if position_ids is None:
        position_ids = b.Range(b.i64(0), b.dim_scalar(ids, 1), b.i64(1))
    s = b.Add(s, value(3, position_ids))
    if seg is not None and seg_ids is not None:
        s = b.Add(s, value(4, seg_ids))
    y = b.LayerNormalization(s, value(5), value(6), axis=-1, epsilon=float(attr(node, "epsilon", 1e-12)))
    if mask is not None:
        mask_index = b.ReduceSum(b.Cast(b.Equal(mask, b.const(np.asarray(1, dtype=mask.dtype.numpy()
                                                                             if mask.dtype else np.int32))),
                                        to=ir.DataType.INT32), b.i64([1]), keepdims=0)
    else:
        mask_index = b.ConstantOfShape(b.Shape(ids, end=1), value=ir.tensor([0], dtype=ir.DataType.INT32))
    mask_index.dtype = ir.DataType.INT32
    batch = b.dim(ids, 0)
    if batch is not None:
        mask_index.shape = ir.Shape([batch])
    return [y, mask_index, s]
