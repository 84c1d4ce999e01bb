"""The op registry: every fact lrpc knows about an ONNX op type, one row per op (docs/design.md, "Layout").

A row says the op's kind, whether it broadcasts its operands, its exact VJP (the ε-rule with ε → 0, which
Input×Gradient and every op without an AttnLRP rule use), its row form (lrpc.rows: how the VJP runs on a
one-row ĝ; None: ĝ is widened first) and, for a fused op, the function that rewrites it into standard ops.
The passes, the analysis, the emitter, the decomposition and `lrpc ops` read this table; no other module
lists op types. Adding an op: one row here, its VJP (in a vjp_* module unless it is a one-liner), one test.

Kinds:
  ELEMENTWISE         acts elementwise on its float operands (the passes walk through it)
  NONLINEAR           elementwise and nonlinear: starts an activation region (identity rule)
  REDUCTION           a Reduce*: the norm pass looks for statistics made from one
  LINEAR              a contraction (MatMul, Gemm, Conv, Einsum)
  NORMALISATION       Softmax and the normalisation ops
  STRUCTURAL          moves or selects values without arithmetic
  NON_DIFFERENTIABLE  zero derivative: its outputs never carry relevance
  FUSED               kept for the forward, decomposed into standard ops for the relevance (lrpc.decompose)
  CONTROL_FLOW        If / Loop / Scan: a static If is inlined like a fused op, the rest refused when relevance
                      flows through it
  REFUSED             a fused op lrpc recognises and refuses, saying why
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrpc import control_flow as cf, fused_attention as fa, fused_deform as fd, fused_function as ff, fused_norms as fn
from lrpc import fused_matmul as fm, fused_quant as fq, fused_recurrent as fr, fused_training as ft, rows
from lrpc import vjp_conv as conv, vjp_linear as lin, vjp_losses as loss, vjp_norms as nrm, vjp_pointwise as pw
from lrpc import vjp_pooling as pool, vjp_quant as qt, vjp_sampling as smp, vjp_scatter as sc
from lrpc import vjp_spectral as spectral, vjp_structural as st
from lrpc.fused_common import MS, PROTECTED_DOMAIN
from lrpc.graph import DECOMPOSITION
from lrpc.vjp_common import has_axes, mean_scale, pointwise, reduce, refuse, reshape_back, same

ELEMENTWISE, NONLINEAR, REDUCTION, LINEAR = "elementwise", "nonlinear", "reduction", "linear"
NORMALISATION, STRUCTURAL, NON_DIFFERENTIABLE = "normalisation", "structural", "non-differentiable"
FUSED, REFUSED, CONTROL_FLOW = "fused", "refused", "control flow"


@dataclass(frozen=True)
class Op:
    kind: str
    vjp: Callable | None = None          # vjp(n, g) → one thunk (or None) per input; lrpc.context.Context n
    broadcasts: bool = False             # the emitter sums each input's ĝ back over broadcast axes
    rows: Callable | None = None         # row form (lrpc.rows), None: the VJP needs the whole ĝ
    decompose: Callable | None = None    # FUSED: handler(node, builder, ctx) → replacement outputs
    differentiable: tuple[int, ...] | None = None   # the inputs relevance flows into (None: all); the others
    #                                                 are shapes, types, indices, masks, ratios
    why: str = ""                        # REFUSED / CONTROL_FLOW: what is refused and why (`lrpc ops` says it)
    quantized: tuple[int, ...] = ()      # outputs that carry relevance although integer: a quantized tensor
    #                                      stands for the float it approximates (its other outputs carry none)
    copies: bool = False                 # ELEMENTWISE, yet its output is its first input's values as they are or
    #                                      repeated (Expand, Identity): like a structural op, it keeps a quantized
    #                                      tensor quantized (onnxruntime moves Q/DQ pairs across it)


# ---- definers: the kind of row, named ----------------------------------------------------------------

def arithmetic(vjp, broadcasts=True) -> Op:
    """Elementwise arithmetic: runs on a row as it stands."""
    return Op(ELEMENTWISE, vjp, broadcasts, rows.pointwise)


def activation(derivative) -> Op:
    """A nonlinear y = f(x): ĝ_x = ĝ_y ⊙ f'(x), f' written in terms of the context."""
    return Op(NONLINEAR, pointwise(derivative), rows=rows.pointwise)


def unary(derivative) -> Op:
    """An elementwise y = f(x) that does not start an activation region."""
    return Op(ELEMENTWISE, pointwise(derivative), rows=rows.pointwise)


def structural(vjp, row_form=None, differentiable=(0,)) -> Op:
    """Moves or selects the values of its data inputs (by default the first; the others say where)."""
    return Op(STRUCTURAL, vjp, rows=row_form, differentiable=differentiable)


def reduction(vjp) -> Op:
    """A Reduce*; with noop_with_empty_axes and no axes it is the identity."""
    def rule(n, g):
        return same(g) if n.attr("noop_with_empty_axes", 0) and not has_axes(n) else vjp(n, g)
    return Op(REDUCTION, rule, differentiable=(0,))


NO_GRADIENT = Op(NON_DIFFERENTIABLE)


ALIAS = DECOMPOSITION   # node.meta key: a fused node's decomposed outputs, one per output (lrpc.decompose)


def _alias(n, g):
    """A fused node: ĝ of each output is ĝ of the same output of its decomposition, whose nodes the walk
    reaches next (they come before the fused node)."""
    targets = n.node.meta.get(ALIAS)
    if targets is None:   # control flow left as it is (a run-time condition, a loop)
        refuse(n, "relevance through control flow whose subgraph reads a relevance-carrying tensor is not "
                  "supported (only an If with a static condition, a Scan of static length, a Loop with a compile-time "
                  "iteration count); export the model without it")
    return {new: (lambda grad=grad: grad) for new, grad in zip(targets, n.grads) if new is not None and grad is not None}


def control_flow(handler=None, inlined: str = "") -> Op:
    why = (f"{inlined}; " if inlined else "") + "refused when relevance flows through a subgraph"
    return Op(CONTROL_FLOW, _alias, decompose=handler, why=why)


def fused(handler) -> Op:
    """A fused op: kept for the forward, decomposed into standard ops for the relevance."""
    return Op(FUSED, _alias, decompose=handler)


def quantized_fused(handler, differentiable=(0,)) -> Op:
    """A pre-fused quantized op (integer in, integer out): kept for the forward, its decomposition into
    dequantize → float op → quantize carries the relevance; its output stands for a float (`quantized`)."""
    return Op(FUSED, _alias, decompose=handler, differentiable=differentiable, quantized=(0,))


def refused(reason: str) -> Op:
    return Op(REFUSED, decompose=fa.refuse(reason), why=reason)


def _transpose(n, g):
    perm = n.attr("perm")
    if perm is None and n.lead:  # the default perm reverses the forward axes, not ĝ's K axis
        perm = list(reversed(range(n.rank(0))))
    return (lambda: n.b.Transpose(g, perm=n.grad_perm(np.argsort(perm))) if perm else n.b.Transpose(g),)


# quantization (onnxruntime's quantize_dynamic / quantize_static): straight-through, weights dequantized
QUANTIZATION: dict[str, Op] = {
    "QuantizeLinear": Op(ELEMENTWISE, qt.quantize, rows=rows.pointwise, differentiable=(0,), quantized=(0,)),
    "DynamicQuantizeLinear": Op(ELEMENTWISE, qt.dynamic_quantize, differentiable=(0,), quantized=(0,)),
    "DequantizeLinear": Op(ELEMENTWISE, qt.dequantize, rows=rows.pointwise, differentiable=(0, 1)),
    "MatMulInteger": Op(LINEAR, qt.matmul_integer, rows=rows.matmul, differentiable=(0, 1), quantized=(0,)),
    "ConvInteger": Op(LINEAR, qt.conv_integer, differentiable=(0, 1), quantized=(0,)),
    f"{MS}::DynamicQuantizeMatMul": Op(LINEAR, qt.dynamic_quantize_matmul, differentiable=(0,)),
    f"{MS}::MatMulIntegerToFloat": Op(LINEAR, qt.matmul_integer_to_float, differentiable=(0, 1)),
    # pre-fused (quantize_static's QOperator format, onnxruntime's optimiser): the node keeps the forward, its
    # DequantizeLinear → float op → QuantizeLinear decomposition carries the relevance (lrpc/fused_quant.py)
    "QLinearMatMul": quantized_fused(fq.qlinear_matmul, (0, 3)),
    "QLinearConv": quantized_fused(fq.qlinear_conv, (0,)),
    f"{MS}::QLinearAdd": quantized_fused(fq.qlinear_binary("Add"), (0, 3)),
    f"{MS}::QLinearMul": quantized_fused(fq.qlinear_binary("Mul"), (0, 3)),
    f"{MS}::QLinearSigmoid": quantized_fused(fq.qlinear_unary("Sigmoid")),
    f"{MS}::QLinearLeakyRelu": quantized_fused(fq.qlinear_unary("LeakyRelu", "alpha")),
    f"{MS}::QLinearSoftmax": quantized_fused(fq.qlinear_unary("Softmax", "axis")),
    f"{MS}::QLinearGlobalAveragePool": quantized_fused(fq.qlinear_unary("GlobalAveragePool")),
    f"{MS}::QLinearAveragePool": quantized_fused(fq.qlinear_unary(
        "AveragePool", "auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")),
    f"{MS}::QLinearConcat": quantized_fused(fq.qlinear_concat, None),
    f"{MS}::QLinearWhere": quantized_fused(fq.qlinear_where, (1, 4)),
    f"{MS}::QGemm": quantized_fused(fq.qgemm, (0, 3)),
    f"{MS}::QAttention": quantized_fused(fq.qattention),
    f"{MS}::QEmbedLayerNormalization": quantized_fused(fq.qembed_layer_norm),
}
QUANTIZED_REFUSED = {   # onnxruntime's quantized fusions of whole blocks (quantize_dynamic of an optimised model)
    f"{MS}::DynamicQuantizeLSTM": refused("DynamicQuantizeLSTM: quantize the model with op_types_to_quantize "
                                          "without LSTM"),
}


# ---- the table: default-domain ops by op type, other domains as "domain::op_type" ------------------------

OPS: dict[str, Op] = {
    # arithmetic
    "Add": arithmetic(lambda n, g: (lambda: g, lambda: g)),
    "Sub": arithmetic(lambda n, g: (lambda: g, lambda: n.b.Neg(g))),
    "Mul": arithmetic(lambda n, g: (lambda: n.b.Mul(g, n.x(1)), lambda: n.b.Mul(g, n.x(0)))),
    "Div": arithmetic(lambda n, g: (lambda: n.b.Div(g, n.x(1)),
                                    lambda: n.b.Neg(n.b.Div(n.b.Mul(g, n.y()), n.x(1))))),
    "Sum": arithmetic(lambda n, g: tuple((lambda: g) for _ in n.inputs)),
    "Mean": arithmetic(pw.mean),
    "Pow": arithmetic(pw.power),
    "Neg": arithmetic(lambda n, g: (lambda: n.b.Neg(g),), broadcasts=False),
    "Identity": Op(ELEMENTWISE, lambda n, g: same(g), rows=rows.pointwise, copies=True),
    "Optional": structural(lambda n, g: same(g)),             # an optional holding the tensor
    "OptionalGetElement": structural(lambda n, g: same(g)),   # the tensor an optional holds (or the tensor itself)
    "Cast": arithmetic(lambda n, g: same(g), broadcasts=False),
    "Dropout": Op(ELEMENTWISE, pw.dropout, rows=rows.pointwise, differentiable=(0,)),
    "CastLike": Op(ELEMENTWISE, lambda n, g: (lambda: g, None), differentiable=(0,)),   # input 1 gives the type
    "Expand": Op(ELEMENTWISE, lambda n, g: (lambda: g, None), broadcasts=True, differentiable=(0,), copies=True),
    "Where": Op(ELEMENTWISE, st.where, broadcasts=True, differentiable=(1, 2)),
    "Max": Op(ELEMENTWISE, pw.extremum, broadcasts=True),
    "Min": Op(ELEMENTWISE, pw.extremum, broadcasts=True),
    "Clip": Op(ELEMENTWISE, pw.clip, broadcasts=True),
    "Mod": arithmetic(pw.mod),
    # elementwise functions
    "Sqrt": unary(lambda n: n.b.Div(n.b.f32(0.5), n.y())),
    "Reciprocal": unary(lambda n: n.b.Neg(n.b.Mul(n.y(), n.y()))),
    "Log": unary(lambda n: n.b.Reciprocal(n.x(0))),
    "Abs": unary(lambda n: n.b.Sign(n.x(0))),
    "Sin": unary(lambda n: n.b.Cos(n.x(0))),
    "Cos": unary(lambda n: n.b.Neg(n.b.Sin(n.x(0)))),
    "Tan": unary(pw.tan_derivative),
    "Asin": unary(pw.asin_derivative),
    "Acos": unary(pw.acos_derivative),
    "Atan": unary(pw.atan_derivative),
    "Sinh": unary(lambda n: n.b.Cosh(n.x(0))),
    "Cosh": unary(lambda n: n.b.Sinh(n.x(0))),
    "Asinh": unary(pw.asinh_derivative),
    "Acosh": unary(pw.acosh_derivative),
    "Atanh": unary(pw.atanh_derivative),
    # activations (start an activation region)
    "Exp": activation(lambda n: n.y()),
    "Tanh": activation(lambda n: n.b.Sub(n.b.f32(1.0), n.b.Mul(n.y(), n.y()))),
    "Sigmoid": activation(lambda n: n.b.Mul(n.y(), n.b.Sub(n.b.f32(1.0), n.y()))),
    "Relu": activation(lambda n: n.b.Cast(n.b.Greater(n.x(0), n.b.f32(0.0)), to=1)),
    "LeakyRelu": activation(lambda n: n.b.Where(n.b.Greater(n.x(0), n.b.f32(0.0)), n.b.f32(1.0),
                                                n.b.f32(n.attr("alpha", 0.01)))),
    "Elu": activation(pw.elu_derivative),
    "Selu": activation(pw.selu_derivative),
    "Celu": activation(pw.celu_derivative),
    "HardSigmoid": activation(pw.hard_sigmoid_derivative),
    "HardSwish": activation(pw.hard_swish_derivative),
    "Softsign": activation(pw.softsign_derivative),
    "ThresholdedRelu": activation(pw.thresholded_relu_derivative),
    "Erf": activation(lambda n: n.b.Mul(n.b.f32(2 / math.sqrt(math.pi)), n.b.Exp(n.b.Neg(n.b.Mul(n.x(0), n.x(0)))))),
    "Gelu": activation(pw.gelu_derivative),
    "Softplus": activation(lambda n: n.b.Sigmoid(n.x(0))),
    "Mish": activation(pw.mish_derivative),
    "Swish": activation(pw.swish_derivative),
    "PRelu": Op(NONLINEAR, pw.prelu, broadcasts=True, rows=rows.pointwise),
    # linear contractions
    "MatMul": Op(LINEAR, lin.matmul, rows=rows.matmul),
    "Gemm": Op(LINEAR, lin.gemm),
    "Conv": Op(LINEAR, lin.conv),
    "ConvTranspose": Op(LINEAR, conv.conv_transpose),
    "Col2Im": Op(LINEAR, conv.col2im, differentiable=(0,)),
    # resampling: linear in the data for fixed coordinates
    "Resize": Op(LINEAR, smp.resize),
    "AffineGrid": Op(LINEAR, smp.affine_grid, differentiable=(0,)),
    "GridSample": Op(LINEAR, smp.grid_sample),
    "RoiAlign": Op(LINEAR, smp.roi_align),   # (max mode: piecewise linear)
    "Det": Op(LINEAR, lin.det),   # multilinear in A's rows
    "Range": Op(LINEAR, lin.arange, differentiable=(0, 2)),   # (float) linear in start and delta
    "DFT": Op(LINEAR, spectral.dft, differentiable=(0,)),
    "STFT": Op(LINEAR, spectral.stft, differentiable=(0, 2)),   # linear in the signal and in the window
    "Einsum": Op(LINEAR, lin.einsum),
    "CumSum": Op(LINEAR, sc.cumsum, differentiable=(0,)),
    "CumProd": Op(LINEAR, sc.cumprod, differentiable=(0,)),   # multilinear in x along the axis (as Det)
    **QUANTIZATION,
    **QUANTIZED_REFUSED,
    # pooling (a fixed linear map of each window, or a selection from it)
    "AveragePool": Op(LINEAR, pool.average_pool),
    "GlobalAveragePool": reduction(pool.global_average_pool),
    "LpPool": reduction(pool.lp_pool),
    "GlobalLpPool": reduction(pool.global_lp_pool),
    "MaxPool": structural(pool.max_pool),
    "GlobalMaxPool": structural(pool.global_max_pool),
    # structural
    "Reshape": structural(reshape_back, rows.reshape),
    "Flatten": structural(reshape_back),
    "Squeeze": structural(reshape_back),
    "Unsqueeze": structural(reshape_back),
    "Transpose": structural(_transpose, rows.transpose),
    "Concat": structural(st.concat, rows.concat, differentiable=None),
    "Split": structural(st.split),
    "Slice": structural(st.slice_, rows.slice_),
    "Gather": structural(st.gather),
    "GatherElements": structural(st.gather_elements),
    "Unique": structural(st.unique),
    "GatherND": structural(st.gather_nd),
    "Tile": structural(st.tile),
    "Pad": structural(st.pad, differentiable=(0, 2)),
    "DepthToSpace": structural(st.depth_to_space),
    "SpaceToDepth": structural(st.space_to_depth),
    "ReverseSequence": structural(st.reverse_sequence),
    "CenterCropPad": structural(st.center_crop_pad),
    "ScatterElements": structural(sc.scatter_elements, differentiable=(0, 2)),
    "ScatterND": structural(sc.scatter_nd, differentiable=(0, 2)),
    "TopK": structural(sc.top_k),
    "OneHot": structural(sc.one_hot, differentiable=(2,)),   # places its [off, on] values
    "MaxUnpool": structural(sc.max_unpool),
    "Compress": structural(sc.compress),
    "TensorScatter": structural(sc.tensor_scatter, differentiable=(0, 1)),
    "ai.onnx.ml::ArrayFeatureExtractor": structural(st.array_feature_extractor),
    "Trilu": structural(lambda n, g: (lambda: n.b.Trilu(g, n.raw(1) if len(n.inputs) > 1 else None,
                                                        upper=n.attr("upper", 1)),)),
    # reductions
    "ReduceSum": reduction(lambda n, g: (lambda: reduce(n, g),)),
    "ReduceMean": reduction(lambda n, g: (lambda: reduce(n, g, mean_scale),)),
    "ReduceL2": reduction(pw.reduce_l2),
    "ReduceSumSquare": reduction(lambda n, g: (lambda: n.b.Mul(reduce(n, g), n.b.Mul(n.b.f32(2.0), n.x(0))),)),
    "ReduceL1": reduction(pw.reduce_l1),
    "ReduceLogSumExp": reduction(pw.reduce_log_sum_exp),
    "ReduceMax": reduction(pw.reduce_extremum),
    "ReduceMin": reduction(pw.reduce_extremum),
    "ReduceLogSum": reduction(pw.reduce_log_sum),
    "ReduceProd": reduction(pw.reduce_prod),
    # normalisations
    "Softmax": Op(NORMALISATION, nrm.softmax, rows=rows.softmax),
    "LogSoftmax": Op(NORMALISATION, nrm.log_softmax),
    "LayerNormalization": Op(NORMALISATION, nrm.layer_norm, rows=rows.normalisation),
    "LpNormalization": Op(NORMALISATION, nrm.lp_norm),
    "BatchNormalization": Op(NORMALISATION, nrm.batch_norm),
    "InstanceNormalization": Op(NORMALISATION, nrm.grouped_norm(None)),
    "GroupNormalization": Op(NORMALISATION, nrm.grouped_norm("num_groups")),
    "MeanVarianceNormalization": Op(NORMALISATION, nrm.mean_variance_norm),
    "LRN": Op(NORMALISATION, nrm.lrn),
    # losses, w.r.t. the scores
    "NegativeLogLikelihoodLoss": Op(LINEAR, loss.nll_loss, differentiable=(0, 2)),
    "SoftmaxCrossEntropyLoss": Op(NORMALISATION, loss.softmax_cross_entropy, differentiable=(0, 2)),
    # zero derivative
    **{op: NO_GRADIENT for op in (
        "Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "IsNaN", "IsInf", "Sign",
        "Floor", "Ceil", "Round", "ArgMax", "ArgMin", "NonZero", "RandomNormal", "RandomUniform",
        "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "EyeLike", "ConstantOfShape",
        "Not", "And", "Or", "Xor", "BitShift", "BitwiseAnd", "Hardmax", "ai.onnx.ml::Binarizer")},
    # a constant table: ONNX floors its float band edges to DFT bins, so it is piecewise constant in them
    "MelWeightMatrix": Op(NON_DIFFERENTIABLE, why="its band edges are floored to DFT bins: zero derivative"),
    # control flow
    "If": control_flow(cf.inline_static_if, "a static condition: the taken branch is inlined"),
    "Loop": control_flow(cf.unroll_loop, "a compile-time iteration count: the body is unrolled"),
    "Scan": control_flow(cf.unroll_scan, "a static length: the body is unrolled"),
    # fused ops, rewritten into the standard ops above (lrpc.decompose)
    "RMSNormalization": fused(fn.simplified_layer_norm),
    "SimplifiedLayerNormalization": fused(fn.simplified_layer_norm),
    "Attention": fused(fa.onnx_attention),
    "RotaryEmbedding": fused(fa.onnx_rotary),
    "DeformConv": fused(fd.deform_conv),
    "RNN": fused(fr.recurrent),
    "GRU": fused(fr.recurrent),
    "LSTM": fused(fr.recurrent),
    f"{PROTECTED_DOMAIN}::SimplifiedLayerNormalization": fused(fn.simplified_layer_norm),
    f"{MS}::SimplifiedLayerNormalization": fused(fn.simplified_layer_norm),
    f"{MS}::SkipLayerNormalization": fused(fn.skip_layer_norm),
    f"{MS}::SkipSimplifiedLayerNormalization": fused(fn.skip_simplified_layer_norm),
    f"{MS}::EmbedLayerNormalization": fused(fn.embed_layer_norm),
    f"{MS}::BiasGelu": fused(fn.bias_gelu),
    f"{MS}::Gelu": fused(fn.bias_gelu),
    f"{MS}::FastGelu": fused(fn.bias_gelu),
    f"{MS}::QuickGelu": fused(fn.quick_gelu),
    f"{MS}::BiasSplitGelu": fused(fn.bias_split_gelu),
    f"{MS}::BiasAdd": fused(fn.bias_add),
    f"{MS}::Attention": fused(fa.ms_attention),
    f"{MS}::MultiHeadAttention": fused(fa.ms_multi_head_attention),
    f"{MS}::RotaryEmbedding": fused(fa.ms_rotary),
    f"{MS}::FusedMatMul": fused(fm.fused_matmul),
    # optimizer steps (no onnxruntime kernel: replaced by their decomposition)
    f"{ft.TRAINING}::Adagrad": fused(ft.adagrad),
    f"{ft.TRAINING}::Momentum": fused(ft.momentum),
    f"{ft.TRAINING}::Adam": fused(ft.adam),
    f"{MS}::GroupQueryAttention": refused("GroupQueryAttention (a generation op with a key/value cache)"),
}


def key(node: ir.Node) -> str:
    """The node's row in OPS: its op type in the default domain, else "domain::op_type"."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


# an ONNX op without a row whose schema defines it by a function body: expanded into that body (lrpc.fused_function)
EXPANDED = fused(ff.expand)


def lookup(node: ir.Node) -> Op | None:
    op = OPS.get(key(node))
    return EXPANDED if op is None and ALIAS in node.meta else op


def is_kind(node: ir.Node | None, *kinds: str) -> bool:
    op = lookup(node) if node is not None else None
    return op is not None and op.kind in kinds


def differentiable_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The inputs of `node` relevance can flow into (all, for an op outside the table)."""
    op = lookup(node)
    if op is None or op.differentiable is None:
        return list(node.inputs)
    return [node.inputs[i] for i in op.differentiable if i < len(node.inputs)]


def carrying_outputs(node: ir.Node, is_float: Callable, quantized_input: bool) -> list[ir.Value]:
    """The outputs of a node with a carrying input that carry relevance: its quantized outputs (integer);
    every output of a structural op (or Expand, Identity) moving a quantized (integer) carrying input; else
    every output `is_float` accepts."""
    op = lookup(node)
    if op is not None and op.quantized:
        return [node.outputs[i] for i in op.quantized]
    if quantized_input and op is not None and (op.kind == STRUCTURAL or op.copies):
        return list(node.outputs)
    return [o for o in node.outputs if is_float(o)]


def is_quantized(node: ir.Node) -> bool:
    return key(node) in QUANTIZATION


def vjp(node: ir.Node) -> Callable | None:
    op = lookup(node)
    return op.vjp if op is not None else None


def decomposition(node: ir.Node, opsets: dict[str, int]) -> Callable | None:
    """What rewrites the node before analysis: its row's handler, or for an ONNX op without a row the expansion
    into its function body at the model's opsets (lrpc.fused_function)."""
    op = OPS.get(key(node))
    if op is None:
        return EXPANDED.decompose if ff.has_body(node, opsets) else None
    return op.decompose


# (domain, op_type) of every fused op
FUSED_KEYS = {tuple(k.split("::")) if "::" in k else ("", k) for k, op in OPS.items() if op.kind == FUSED}


def with_vjp() -> list[str]:
    """Op types relevance can flow through: an exact VJP (and, where the passes assign one, an AttnLRP rule)."""
    return sorted(k for k, op in OPS.items() if op.vjp is not None and op.kind not in (FUSED, CONTROL_FLOW))


def of_kind(kind: str) -> list[str]:
    """The op types of a kind, as `lrpc ops` lists them (without lrpc's own protected domain)."""
    return sorted(k for k, op in OPS.items() if op.kind == kind and not k.startswith(PROTECTED_DOMAIN + "::"))


STATUS = {FUSED: "decomposed", REFUSED: "refused", CONTROL_FLOW: "control flow",
          NON_DIFFERENTIABLE: "zero derivative"}


def describe() -> list[tuple[str, str, str]]:
    """(op, what lrpc does with it, detail) for every row, as `lrpc ops` prints them: "rule" (an exact VJP,
    AttnLRP rules where the passes assign one), "decomposed", "control flow", "refused", "zero derivative"."""
    table = []
    for k, op in sorted(OPS.items()):
        if k.startswith(PROTECTED_DOMAIN + "::"):
            continue
        detail = op.why or op.kind
        if op.differentiable is not None:
            detail += f"; relevance into input{'s' if len(op.differentiable) > 1 else ''} " + \
                ", ".join(map(str, op.differentiable)) + " only"
        table.append((k, STATUS.get(op.kind, "rule"), detail))
    return table
