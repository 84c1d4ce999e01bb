"""Decompositions of the pre-fused quantized ops (see lrpc.decompose; docs/design.md, "Quantized models").

`quantize_static(..., quant_format=QuantFormat.QOperator)` and onnxruntime's own optimiser write each
quantized layer as one op (QLinearMatMul, QLinearConv, com.microsoft's QLinearAdd, QGemm, …): integer in,
integer out, the float computation between a dequantize and a quantize inside the op. Each decomposes into
exactly that: DequantizeLinear of every quantized input → the float op → QuantizeLinear of the output (QGemm
without an output scale stops at the float op). The fused node keeps computing the model's forward; its
decomposition reads the same quantized inputs and carries the relevance, straight-through like a QDQ model
(lrpc.vjp_quant). Weights stay int8 and are dequantized by a DequantizeLinear of constants, which the linear
pass reads as a constant weight (ε / γ on the dequantized weight).
"""

from __future__ import annotations

from lrpc.fused_attention import self_attention
from lrpc.fused_common import fail, optional_input
from lrpc.fused_norms import embedding_layer_norm
from lrpc.graph import attr


def _dequantize(b, node, data: int, axis: int | None = None, scale: int | None = None, zero: int | None = None):
    """DequantizeLinear of input `data` with its scale and zero point (the inputs that follow it unless given);
    a per-axis scale (1-D) lies along `axis`."""
    scale, zero = data + 1 if scale is None else scale, data + 2 if zero is None else zero
    x, scale, zero = node.inputs[data], node.inputs[scale], optional_input(node, zero)
    inputs = [x, scale, *([zero] if zero is not None else [])]
    axis = axis if b.rank(scale) == 1 else None
    for reader, _ in x.uses():   # the model's own, if it has one (RMSNorm reads the same tensor as its statistic)
        if reader.op_type == "DequantizeLinear" and list(reader.inputs) == inputs and attr(reader, "axis") == axis:
            return reader.outputs[0]
    return b.DequantizeLinear(*inputs, axis=axis)


def _quantize(b, node, y, scale: int):
    """QuantizeLinear of the float result with the output scale (input `scale`) and zero point (the next)."""
    zero = optional_input(node, scale + 1)
    return b.QuantizeLinear(y, node.inputs[scale], *([zero] if zero is not None else []))


def qlinear_matmul(node, b, ctx):
    """QLinearMatMul: Q(DQ(a) · DQ(b)); a per-column weight scale on b's last axis."""
    return [_quantize(b, node, b.MatMul(_dequantize(b, node, 0), _dequantize(b, node, 3, axis=-1)), 6)]


def qlinear_conv(node, b, ctx):
    """QLinearConv: Q(Conv(DQ(x), DQ(w), B · x_scale · w_scale)); a per-channel weight scale on w's axis 0;
    the int32 bias has scale x_scale · w_scale and zero point 0 (the ONNX definition)."""
    attrs = {name: a.value for name, a in node.attributes.items()}
    bias = optional_input(node, 8)
    if bias is not None:
        bias = b.Mul(b.Cast(bias, to=b.dtype), b.Mul(node.inputs[1], node.inputs[4]))
    y = b.Conv(_dequantize(b, node, 0), _dequantize(b, node, 3, axis=0), *([bias] if bias is not None else []),
               **attrs)
    return [_quantize(b, node, y, 6)]


def qlinear_binary(op_type: str):
    """com.microsoft QLinearAdd / QLinearMul: Q(DQ(A) op DQ(B))."""
    def handler(node, b, ctx):
        return [_quantize(b, node, b.op(op_type, _dequantize(b, node, 0), _dequantize(b, node, 3)), 6)]
    return handler


def qlinear_unary(op_type: str, *attributes: str):
    """com.microsoft QLinearSigmoid / QLinearLeakyRelu / QLinearSoftmax / QLinearGlobalAveragePool /
    QLinearAveragePool: Q(op(DQ(X))), the op's attributes carried over."""
    def handler(node, b, ctx):
        if attr(node, "channels_last", 0):
            raise fail(node, "channels_last=1")
        if node.op_type == "QLinearSoftmax" and attr(node, "opset", 13) < 13:
            rank, axis = b.rank(node.inputs[0]), attr(node, "axis", -1)
            if rank is None or axis % rank != rank - 1:
                raise fail(node, "opset < 13 with a softmax over more than the last axis")
        attrs = {a: attr(node, a) for a in attributes}
        return [_quantize(b, node, b.op(op_type, _dequantize(b, node, 0), **attrs), 3)]
    return handler


def qlinear_concat(node, b, ctx):
    """com.microsoft QLinearConcat (Y_scale, Y_zero_point, then X, X_scale, X_zero_point per input):
    Q(Concat(DQ(X)…))."""
    parts = [_dequantize(b, node, i) for i in range(2, len(node.inputs), 3)]
    return [_quantize(b, node, b.Concat(*parts, axis=attr(node, "axis")), 0)]


def qlinear_where(node, b, ctx):
    """com.microsoft QLinearWhere (condition, X, its scale and zero point, Y, …, Z's): Q(Where(c, DQ(X), DQ(Y)))."""
    return [_quantize(b, node, b.Where(node.inputs[0], _dequantize(b, node, 1), _dequantize(b, node, 4)), 7)]


def qgemm(node, b, ctx):
    """com.microsoft QGemm: alpha · DQ(A)' · DQ(B)' + C · alpha · A_scale · B_scale (C int32, zero point 0),
    quantized when Y_scale is given, else the float result; a per-column B scale lies along N."""
    alpha, trans_a, trans_b = attr(node, "alpha", 1.0), attr(node, "transA", 0), attr(node, "transB", 0)
    bias = optional_input(node, 6)
    if bias is not None:
        scale = b.Mul(node.inputs[1], node.inputs[4])
        bias = b.Mul(b.Cast(bias, to=b.dtype), scale if alpha == 1.0 else b.Mul(scale, b.scalar(alpha)))
    y = b.Gemm(_dequantize(b, node, 0), _dequantize(b, node, 3, axis=0 if trans_b else 1),
               *([bias] if bias is not None else []), alpha=alpha, transA=trans_a, transB=trans_b)
    return [y if optional_input(node, 7) is None else _quantize(b, node, y, 7)]


def qattention(node, b, ctx):
    """com.microsoft QAttention (quantize_dynamic of a model with fused Attention): Attention on DQ(input) (its
    scale input 3, zero point 6) and DQ(weight) (scale 4, per tensor or per column; zero point 7), after a float
    past state (input 8; output 1 present)."""
    x, w = _dequantize(b, node, 0, scale=3, zero=6), _dequantize(b, node, 1, axis=1, scale=4, zero=7)
    return self_attention(node, b, x, w, optional_input(node, 2), optional_input(node, 5), None,
                          optional_input(node, 8))


def qembed_layer_norm(node, b, ctx):
    """com.microsoft QEmbedLayerNormalization (quantize_dynamic of a model whose embeddings onnxruntime's
    transformer optimiser fused): EmbedLayerNormalization on the dequantized tables, γ and β (each input i of
    2…6 has its scale at i + 6 and its zero point at i + 11). A table is looked up, then its rows dequantized:
    the quantized-embedding form lrpc.analysis finds, so relevance reaches the token ids."""
    def value(i, indices=None):
        rows = node.inputs[i] if indices is None else b.Gather(node.inputs[i], indices)
        zero = optional_input(node, i + 11)
        return b.DequantizeLinear(rows, node.inputs[i + 6], *([zero] if zero is not None else []))
    return embedding_layer_norm(node, b, value)[:2]
