"""VJPs of the quantization ops that onnxruntime's quantizers emit (docs/design.md, "Quantized models").

The explainer's forward keeps the quantized ops; the relevance pass runs in float through them:
a quantize op is straight-through (ĝ_x = ĝ_q / scale: rounding counts as the identity), a dequantize
op is its exact VJP (ĝ_q = ĝ_y · scale), so a Q→DQ pair on an activation is the identity. An integer
contraction (MatMulInteger, ConvInteger, com.microsoft's DynamicQuantizeMatMul / MatMulIntegerToFloat)
uses its dequantized weight (w − w_zero_point) · w_scale as a float constant.
"""

from __future__ import annotations

from lrpc import vjp_linear as lin
from lrpc.graph import DECOMPOSITION
from lrpc.vjp_common import along_axis, refuse


def _safe(n, scale):
    """A scale as a divisor: a zero scale (an all-zero tensor was quantized) divides by 1 — its ĝ is 0."""
    b = n.b
    return b.Where(b.Equal(scale, b.f32(0.0)), b.f32(1.0), scale)


def _along(n, i: int, data: int = 0):
    """Input i (a scale or zero point) shaped to broadcast against input `data`: per-tensor as it is,
    per-axis [C] reshaped to [C, 1, …] at the op's `axis` (default 1), blocked [.., B, ..] repeated block_size
    times along `axis` (`_blocks`)."""
    value = n.x(i)
    if n.rank(i) == 0:
        return value
    r = n.rank(data)
    if r is None:
        refuse(n, "a per-axis scale on a tensor of unknown rank; re-export the model with static ranks")
    axis = n.attr("axis", 1) % r
    if n.attr("block_size", 0):
        return along_axis(n.b, value, axis, r, n.b.Transpose(_blocks(n, i, data), perm=[1, 0]))
    return n.b.Reshape(value, n.b.i64([-1] + [1] * (r - axis - 1)))


def _blocks(n, i: int, data: int = 0):
    """[d, B]: 1 where element k of input `data`'s quantized axis (d long) lies in block j of input i's (B long),
    k // block_size = j."""
    b = n.b
    axis = n.attr("axis", 1) % n.rank(data)
    def count(v):   # Range(v's length along the axis)
        return b.Range(b.i64(0), b.Reshape(b.Shape(v, start=axis, end=axis + 1), b.i64([])), b.i64(1))
    owner = b.Div(count(n.raw(data)), b.i64(int(n.attr("block_size"))))
    return b.Cast(b.Equal(b.Unsqueeze(owner, b.i64([1])), b.Unsqueeze(count(n.raw(i)), b.i64([0]))), to=1)


def _centred(n, i: int, zero_point: int, channels_first: bool = False):
    """Input i minus its zero point (input `zero_point`, optional), in float32. A per-channel zero point [C]
    lies along the last axis (a MatMul weight's columns), or along the first when `channels_first` (a Conv
    weight's output channels)."""
    if len(n.inputs) <= zero_point or n.inputs[zero_point] is None:
        return n.x(i)
    zp = n.x(zero_point)
    if channels_first and n.rank(zero_point) == 1:
        zp = n.b.Reshape(zp, n.b.i64([-1] + [1] * (n.rank(i) - 1)))
    return n.b.Sub(n.x(i), zp)


def _constant_weight(n, op: str):
    if n.carries(1):
        refuse(n, f"{op} of two relevance-carrying tensors (a quantized activation product) is not supported; "
                  "quantize only MatMuls with constant weights (onnxruntime: extra_options MatMulConstBOnly=True)")


def _paired(quantize_node) -> bool:
    """Is every reader relevance can come back from of this QuantizeLinear's output a DequantizeLinear with the
    same scale and zero point (a Q→DQ pair on an activation; a pre-fused op reading it passes relevance through
    its decomposition's)? Then ĝ of the quantized tensor is kept in the float's units: the pair is the identity
    without ĝ·scale / scale, which overflows for a huge scale (a quantized attention mask's ~1e36)."""
    readers = [node for node, _ in quantize_node.outputs[0].uses() if DECOMPOSITION not in node.meta]
    return bool(readers) and all(
        r.op_type == "DequantizeLinear" and list(r.inputs[1:]) == list(quantize_node.inputs[1:])
        and _axis(r) == _axis(quantize_node) for r in readers)


def _axis(node):
    """The axis a per-axis scale lies along (None for a per-tensor scale, where `axis` means nothing)."""
    scale = node.inputs[1]
    if scale.shape is not None and scale.shape.rank() == 0:
        return None
    return node.attributes["axis"].value if "axis" in node.attributes else 1


def quantize(n, g):
    """QuantizeLinear: straight-through, ĝ_x = ĝ_q / scale (ĝ_x = ĝ_q when paired with its dequantizations)."""
    return (lambda: g if _paired(n.node) else n.b.Div(g, _safe(n, _along(n, 1))),)


def dynamic_quantize(n, g):
    """DynamicQuantizeLinear (x → uint8 q, its scale, its zero point): straight-through on q, ĝ_x = ĝ_q / scale."""
    return (lambda: n.b.Div(g, _safe(n, n.y(1))),)


def dequantize(n, g):
    """DequantizeLinear y = (q − zero_point) · scale: ĝ_q = ĝ_y · scale (ĝ_q = ĝ_y after a paired quantize); a
    scale that carries relevance (a graph input; never in a quantized model, whose scales are constants or
    DynamicQuantizeLinear's, which carry none) gets ĝ_y · (q − zero_point) summed over all but its own axis."""
    b = n.b

    def scale():
        centred = n.x(0) if len(n.inputs) < 3 or n.inputs[2] is None else b.Sub(n.x(0), _along(n, 2))
        rank, lead = n.rank(0), 1 if n.lead else 0
        if rank is None:
            refuse(n, "a relevance-carrying scale on a tensor of unknown rank")
        own = n.grad_axis(n.attr("axis", 1) % rank)
        if n.attr("block_size", 0):   # each block's sum along the axis
            return along_axis(b, b.Mul(g, centred), own, lead + rank, _blocks(n, 1))
        return b.ReduceSum(b.Mul(g, centred), b.i64([a for a in range(lead, lead + rank)
                                                     if n.rank(1) == 0 or a != own]), keepdims=0)
    producer = n.node.inputs[0].producer()
    if producer is not None and producer.op_type == "QuantizeLinear" and _paired(producer):
        return (lambda: g, scale)
    return (lambda: b.Mul(g, _along(n, 1)), scale)


def matmul_integer(n, g):
    """MatMulInteger y = (a − a_zp)·(b − b_zp) in int32: ĝ_a = ĝ_y·(b − b_zp)ᵀ."""
    _constant_weight(n, "MatMulInteger")
    return (lambda: lin.matmul_weight_grad(n, g, _centred(n, 1, 3)), None)


def conv_integer(n, g):
    """ConvInteger y = conv(x − x_zp, w − w_zp) in int32: ĝ_x as Conv's, with the weight w − w_zp."""
    _constant_weight(n, "ConvInteger")
    return (lin.conv(n, g, weight=_centred(n, 1, 3, channels_first=True))[0], None)


def dynamic_quantize_matmul(n, g):
    """com.microsoft::DynamicQuantizeMatMul y = a·((b − b_zp)·b_scale) + bias (a float; its quantization
    inside the op is straight-through): ĝ_a = ĝ_y·((b − b_zp)·b_scale)ᵀ."""
    _constant_weight(n, "DynamicQuantizeMatMul")
    return (lambda: lin.matmul_weight_grad(n, g, n.b.Mul(_centred(n, 1, 3), n.x(2))),)


def matmul_integer_to_float(n, g):
    """com.microsoft::MatMulIntegerToFloat y = (a − a_zp)·(b − b_zp)·a_scale·b_scale + bias:
    ĝ_a = ĝ_y·((b − b_zp)·b_scale·a_scale)ᵀ."""
    _constant_weight(n, "MatMulIntegerToFloat")
    return (lambda: lin.matmul_weight_grad(n, g, n.b.Mul(n.b.Mul(_centred(n, 1, 5), n.x(3)), n.x(2))), None)
