"""Decompose fused ops into standard ONNX ops, so models already optimised for onnxruntime compile too.

onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`) and ONNX
opset 23 replace whole sub-graphs by single ops (Attention, SkipLayerNormalization, BiasGelu, …). The
passes find rules by dataflow over standard ops, so every fused op is rewritten here, before analysis,
into the standard ops it stands for, with the exact semantics of its onnxruntime CPU kernel / ONNX
reference (docs/ContribOperators.md): norms become LayerNormalization or the RMSNorm chain
`x · Reciprocal(Sqrt(ReduceMean(x²) + ε)) · w` (the statistic a separate tensor the norm pass
freezes); biased activations become `Add(x, bias)` then the activation (the bias stays outside the
activation region); attention becomes MatMul(Q, Kᵀ) · scale + mask → Softmax → MatMul(·, V) (the two
bilinear products and the softmax the passes look for). The model's outputs are unchanged.

Unsupported attribute combinations (past key/value caches, packed layouts, rotary inside Attention, …)
raise LrpcError naming the node, the op and the attribute.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from lrpc import rules
from lrpc.errors import LrpcError
from lrpc.graph import Builder, _plain, attr

MS = "com.microsoft"
# Default-domain op names that only onnxruntime knows (registered by ORT in the ONNX domain).
ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}
# Where `protect_nonstandard_ops` moves them so that onnx's version converter leaves them alone.
PROTECTED_DOMAIN = "lrp.ort"
GELU_OPSET = 20
LOWEST = float(np.finfo(np.float32).min)


class _Inserter(Builder):
    """lrpc's Builder, but new nodes go before the fused node being replaced (`anchor`)."""

    anchor: ir.Node | None = None                 # the fused node being replaced
    dtype: ir.DataType = ir.DataType.FLOAT        # its float type (for constants)
    model: ir.Model | None = None
    dirty = False                                 # the graph changed since shapes were last inferred

    def op(self, op_type: str, *inputs, _domain: str = "", _outputs: int = 1, **attrs):
        attrs = {k: _plain(v) for k, v in attrs.items() if v is not None}
        outputs = [ir.Value(name=self.fresh(op_type.lower())) for _ in range(_outputs)]
        node = ir.Node(_domain, op_type, inputs, ir.convenience.convert_attributes(attrs),
                       outputs=outputs, name=self.fresh(op_type))
        self.graph.insert_before(self.anchor, node)
        return outputs[0] if _outputs == 1 else tuple(outputs)

    def rank(self, value: ir.Value | None) -> int | None:
        if value is not None and value.shape is None and self.dirty:
            self.infer()
        return _rank(value)

    def dim(self, value: ir.Value | None, axis: int):
        if value is not None and value.shape is None and self.dirty:
            self.infer()
        return _static_dim(value, axis)

    def infer(self) -> None:
        """Shapes of what earlier decompositions made (ops onnx does not know have none): re-infer."""
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(self.model)
        self.dirty = False

    def scalar(self, value: float) -> ir.Value:
        """A float constant of the fused node's float type."""
        return self.const(np.asarray(value, dtype=self.dtype.numpy()), hint="c")

    def dim_scalar(self, value: ir.Value, axis: int) -> ir.Value:
        """One dimension of `value` as an int64 scalar (for Range)."""
        end = axis + 1 if axis != -1 else None
        return self.Squeeze(self.Shape(value, start=axis, end=end), self.i64([0]))


# ---- small helpers -------------------------------------------------------------------------------

def _fail(node: ir.Node, what: str) -> LrpcError:
    return LrpcError(f"node '{node.name}' ({node.domain + '.' if node.domain else ''}{node.op_type}): {what} is not "
                     "supported by lrpc's decomposition of fused ops; export the model without this fusion")


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i] is not None else None


def _used(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def _output_used(node: ir.Node, i: int) -> bool:
    return len(node.outputs) > i and _used(node.outputs[i])


def _require_unused(node: ir.Node, indices, names) -> None:
    for i, name in zip(indices, names):
        if _output_used(node, i):
            raise _fail(node, f"its output {i} ('{name}') being used")


def _float_type(node: ir.Node, *candidates: int) -> ir.DataType:
    for i in candidates:
        v = _input(node, i)
        if v is not None and v.dtype is not None and v.dtype.is_floating_point():
            return v.dtype
    return ir.DataType.FLOAT


def _static_dim(value: ir.Value | None, axis: int):
    if value is None or value.shape is None or value.shape.rank() is None:
        return None
    try:
        return value.shape[axis]
    except IndexError:
        return None


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def _norm_axes(b: _Inserter, node: ir.Node, x: ir.Value, axis: int) -> ir.Value:
    if axis < 0:
        return b.i64(list(range(axis, 0)))
    r = b.rank(x)
    if r is None:
        raise _fail(node, f"axis={axis} with an input of unknown rank")
    return b.i64(list(range(axis, r)))


def _rms_norm(b: _Inserter, x: ir.Value, w: ir.Value | None, eps: float, axes: ir.Value,
              dtype: ir.DataType) -> ir.Value:
    """RMSNorm as exporters write it: x · Reciprocal(Sqrt(ReduceMean(x²) + ε)) · w (statistic a separate tensor)."""
    low_precision = dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
    h = b.Cast(x, to=ir.DataType.FLOAT) if low_precision else x
    saved, b.dtype = b.dtype, (ir.DataType.FLOAT if low_precision else dtype)
    inv = b.Reciprocal(b.Sqrt(b.Add(b.ReduceMean(b.Pow(h, b.scalar(2.0)), axes, keepdims=1), b.scalar(eps))))
    b.dtype = saved
    y = b.Mul(h, inv)
    if low_precision:
        y = b.Cast(y, to=dtype)
    return y if w is None else b.Mul(y, w)


def _gelu(b: _Inserter, x: ir.Value, approximate: str, opset: int) -> ir.Value:
    """Gelu (opset ≥ 20), else the chain exporters emit at older opsets (erf, or GPT-2's tanh form)."""
    if opset >= GELU_OPSET:
        return b.Gelu(x, approximate=approximate)
    if approximate == "tanh":
        inner = b.Mul(b.scalar(math.sqrt(2.0 / math.pi)),
                      b.Add(x, b.Mul(b.scalar(0.044715), b.Pow(x, b.scalar(3.0)))))
        return b.Mul(b.Mul(b.scalar(0.5), x), b.Add(b.scalar(1.0), b.Tanh(inner)))
    return b.Mul(b.Mul(x, b.Add(b.Erf(b.Div(x, b.scalar(math.sqrt(2.0)))), b.scalar(1.0))), b.scalar(0.5))


# ---- elementwise and norms ------------------------------------------------------------------------

def _bias_gelu(node, b, ctx):
    """com.microsoft BiasGelu / Gelu / FastGelu: Gelu(A + B) (erf; tanh form for FastGelu)."""
    x = node.inputs[0]
    bias = _input(node, 1)
    if bias is not None:
        x = b.Add(x, bias)
    return [_gelu(b, x, "tanh" if node.op_type == "FastGelu" else "none", ctx.opset)]


def _quick_gelu(node, b, ctx):
    """com.microsoft QuickGelu: x · Sigmoid(α·x), α = alpha (default 1.702)."""
    x = node.inputs[0]
    alpha = float(attr(node, "alpha", 1.702))
    z = x if alpha == 1.0 else b.Mul(x, b.scalar(alpha))
    return [b.Mul(x, b.Sigmoid(z))]


def _bias_split_gelu(node, b, ctx):
    """com.microsoft BiasSplitGelu: h = X + bias; left, right = halves of h (last axis); left · Gelu(right)."""
    h = b.Add(node.inputs[0], node.inputs[1])
    left, right = b.Split(h, axis=-1, num_outputs=2, _outputs=2)
    return [b.Mul(left, _gelu(b, right, "none", ctx.opset))]


def _bias_add(node, b, ctx):
    """com.microsoft BiasAdd: X + bias + skip."""
    return [b.Add(b.Add(node.inputs[0], node.inputs[1]), node.inputs[2])]


def _skip_sum(node, b, bias_index):
    s = b.Add(node.inputs[0], node.inputs[1])     # onnxruntime: (input + skip) + bias
    bias = _input(node, bias_index)
    return s if bias is None else b.Add(s, bias)


def _skip_layer_norm(node, b, ctx):
    """com.microsoft SkipLayerNormalization: s = input + skip (+ bias); LayerNormalization(s, γ, β);
    output 3 (input_skip_bias_sum) is s."""
    _require_unused(node, (1, 2), ("mean", "inv_std_var"))
    s = _skip_sum(node, b, 4)
    beta = _input(node, 3)
    y = b.LayerNormalization(s, node.inputs[2], *([beta] if beta is not None else []), axis=-1,
                             epsilon=float(attr(node, "epsilon", 1e-12)))
    return [y, None, None, s]


def _skip_simplified_layer_norm(node, b, ctx):
    """com.microsoft SkipSimplifiedLayerNormalization: s = input + skip (+ bias); RMSNorm(s)·γ; output 3 is s."""
    _require_unused(node, (1, 2), ("mean", "inv_std_var"))
    s = _skip_sum(node, b, 3)
    y = _rms_norm(b, s, node.inputs[2], float(attr(node, "epsilon", 1e-12)), b.i64([-1]), b.dtype)
    return [y, None, None, s]


def _simplified_layer_norm(node, b, ctx):
    """SimplifiedLayerNormalization (onnxruntime, default domain) and ONNX RMSNormalization-23:
    x / sqrt(mean(x², axes [axis, rank)) + ε) · scale."""
    _require_unused(node, (1,), ("inv_std_var",))
    x = node.inputs[0]
    axes = _norm_axes(b, node, x, int(attr(node, "axis", -1)))
    return [_rms_norm(b, x, node.inputs[1], float(attr(node, "epsilon", 1e-5)), axes, b.dtype)]


def _embed_layer_norm(node, b, ctx):
    """com.microsoft EmbedLayerNormalization: s = word[ids] + pos[position_ids or 0..S-1] (+ segment[seg]);
    output = LayerNormalization(s, γ, β); mask_index = #(mask == 1) per row (int32, zeros without a mask);
    embedding_sum = s."""
    ids, seg_ids, word, pos, seg = (_input(node, i) for i in range(5))
    gamma, beta, mask, position_ids = _input(node, 5), _input(node, 6), _input(node, 7), _input(node, 8)
    s = b.Gather(word, ids)
    if position_ids is None:
        position_ids = b.Range(b.i64(0), b.dim_scalar(ids, 1), b.i64(1))
    s = b.Add(s, b.Gather(pos, position_ids))
    if seg is not None and seg_ids is not None:
        s = b.Add(s, b.Gather(seg, seg_ids))
    y = b.LayerNormalization(s, gamma, beta, axis=-1, epsilon=float(attr(node, "epsilon", 1e-12)))
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


# ---- attention --------------------------------------------------------------------------------------

def _heads(b, x, num_heads, perm):
    """[B, S, N·h] → [B, N, S, h] (perm (0, 2, 1, 3)) or Kᵀ [B, N, h, S] (perm (0, 2, 3, 1))."""
    return b.Transpose(b.Reshape(x, b.i64([0, 0, num_heads, -1])), perm=perm)


def _merge_heads(b, ctx_bnsh):
    return b.Reshape(b.Transpose(ctx_bnsh, perm=[0, 2, 1, 3]), b.i64([0, 0, -1]))


def _ort_mask(node, b, mask, query, key, causal: bool, filter_value: float):
    """The additive mask onnxruntime's CPU attention builds (PrepareMask): key positions a mask hides get
    mask_filter_value; with unidirectional=1 the future gets the float32 lowest (it overrides the mask).
    Returns a tensor broadcastable to [B, N, S, T] (or None)."""
    zero, hidden = b.scalar(0.0), b.scalar(filter_value)
    additive = None
    if mask is not None:
        r = b.rank(mask)
        if r is None:
            raise _fail(node, "a mask of unknown rank")
        if r == 1:
            t = b.dim_scalar(key, 1)
            positions = b.Unsqueeze(b.Range(b.i64(0), t, b.i64(1)), b.i64([0]))      # [1, T]
            m = b.Cast(mask, to=ir.DataType.INT64)
            batch_dim, mask_dim = b.dim(query, 0), b.dim(mask, 0)
            two_b = isinstance(batch_dim, int) and isinstance(mask_dim, int) and mask_dim == 2 * batch_dim
            if isinstance(batch_dim, int) and isinstance(mask_dim, int) and mask_dim not in (batch_dim, 2 * batch_dim):
                raise _fail(node, f"a 1-D mask_index of length {mask_dim} (3·batch+2 form)")
            if two_b:
                end, start = b.Split(m, num_outputs=2, axis=0, _outputs=2)
            else:
                end, start = m, None
            allowed = b.Less(positions, b.Unsqueeze(end, b.i64([1])))              # [B, T]
            if start is not None:
                allowed = b.And(allowed, b.GreaterOrEqual(positions, b.Unsqueeze(start, b.i64([1]))))
            allowed = b.Unsqueeze(allowed, b.i64([1, 2]))                            # [B, 1, 1, T]
        elif r == 2:
            allowed = b.Unsqueeze(b.Greater(mask, _int_zero(b, mask)), b.i64([1, 2]))
        elif r == 3:
            allowed = b.Unsqueeze(b.Greater(mask, _int_zero(b, mask)), b.i64([1]))
        else:
            raise _fail(node, f"a {r}-D mask_index")
        additive = b.Where(allowed, zero, hidden)
    if causal:
        future_ok = _causal_allowed(b, query, key)
        additive = b.Where(future_ok, additive if additive is not None else zero, b.scalar(LOWEST))
    return additive


def _int_zero(b, mask):
    return b.const(np.asarray(0, dtype=mask.dtype.numpy() if mask.dtype is not None else np.int32))


def _causal_allowed(b, query, key, q_axis=1, k_axis=1):
    """[S, T] bool: key j visible from query i iff j ≤ i (no past)."""
    i = b.Unsqueeze(b.Range(b.i64(0), b.dim_scalar(query, q_axis), b.i64(1)), b.i64([1]))
    j = b.Unsqueeze(b.Range(b.i64(0), b.dim_scalar(key, k_axis), b.i64(1)), b.i64([0]))
    return b.LessOrEqual(j, i)


def _attend(b, q, kt, v, scale, additive, bias):
    """softmax(q·kᵀ·scale + mask + bias) · v, all [B, N, ·, ·]."""
    scores = b.Mul(b.MatMul(q, kt), b.scalar(scale))
    if additive is not None:
        scores = b.Add(scores, additive)
    if bias is not None:
        scores = b.Add(scores, bias)
    return b.MatMul(b.Softmax(scores, axis=-1), v)


def _qkv_sizes(node, b, weights):
    sizes = attr(node, "qkv_hidden_sizes")
    if sizes:
        return [int(s) for s in sizes]
    width = b.dim(weights, 1)
    if not isinstance(width, int):
        raise _fail(node, "merged QKV weights of unknown width without qkv_hidden_sizes")
    return [width // 3] * 3


def _head_size(node, hidden: int, num_heads: int) -> int:
    if hidden % num_heads:
        raise _fail(node, f"hidden size {hidden} not divisible by num_heads={num_heads}")
    return hidden // num_heads


def _ms_attention(node, b, ctx):
    """com.microsoft Attention (no past): QKV = X·W (+ bias), per-head softmax(Q·Kᵀ·scale + mask (+ bias))·V."""
    for i, name in ((4, "past"), (6, "past_sequence_length")):
        if _input(node, i) is not None:
            raise _fail(node, f"input '{name}' (key/value cache)")
    for name in ("do_rotary", "past_present_share_buffer"):
        if attr(node, name, 0):
            raise _fail(node, f"attribute {name}=1")
    _require_unused(node, (1,), ("present",))
    x, w, bias, mask, attn_bias = (_input(node, i) for i in (0, 1, 2, 3, 5))
    n = int(attr(node, "num_heads"))
    sizes = _qkv_sizes(node, b, w)
    head = _head_size(node, sizes[0], n)
    _head_size(node, sizes[2], n)
    scale = float(attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head)
    qkv = b.MatMul(x, w)
    if bias is not None:
        qkv = b.Add(qkv, bias)
    q, k, v = b.Split(qkv, b.i64(sizes), axis=-1, _outputs=3)
    additive = _ort_mask(node, b, mask, x, x, bool(attr(node, "unidirectional", 0)),
                         float(attr(node, "mask_filter_value", -10000.0)))
    out = _attend(b, _heads(b, q, n, [0, 2, 1, 3]), _heads(b, k, n, [0, 2, 3, 1]), _heads(b, v, n, [0, 2, 1, 3]),
                  scale, additive, attn_bias)
    return [_merge_heads(b, out)]


def _ms_multi_head_attention(node, b, ctx):
    """com.microsoft MultiHeadAttention with separate 3-D query / key / value (no past, not packed)."""
    for i, name in ((6, "past_key"), (7, "past_value"), (8, "past_sequence_length"), (9, "cache_indirection")):
        if _input(node, i) is not None:
            raise _fail(node, f"input '{name}'")
    _require_unused(node, (1, 2, 3), ("present_key", "present_value", "qk"))
    q, k, v, bias, mask, attn_bias = (_input(node, i) for i in range(6))
    if k is None or v is None:
        raise _fail(node, "packed QKV / KV input (key or value absent)")
    for value, name in ((q, "query"), (k, "key"), (v, "value")):
        if b.rank(value) != 3:
            raise _fail(node, f"{name} of rank {b.rank(value)} (only [batch, sequence, hidden] is handled)")
    n = int(attr(node, "num_heads"))
    if bias is not None:
        width = b.dim(bias, 0)
        hq, hv = b.dim(q, 2), b.dim(v, 2)
        if not all(isinstance(d, int) for d in (width, hq, hv)):
            raise _fail(node, "a bias with unknown hidden sizes")
        bq, bk, bv = b.Split(bias, b.i64([hq, width - hq - hv, hv]), axis=0, _outputs=3)
        q, k, v = b.Add(q, bq), b.Add(k, bk), b.Add(v, bv)
    hq = b.dim(node.inputs[0], 2)
    head = _head_size(node, hq, n) if isinstance(hq, int) else None
    scale = float(attr(node, "scale", 0.0))
    if not scale:
        if head is None:
            raise _fail(node, "unknown head size without a scale attribute")
        scale = 1.0 / math.sqrt(head)
    additive = _ort_mask(node, b, mask, node.inputs[0], node.inputs[1], bool(attr(node, "unidirectional", 0)),
                         float(attr(node, "mask_filter_value", -10000.0)))
    out = _attend(b, _heads(b, q, n, [0, 2, 1, 3]), _heads(b, k, n, [0, 2, 3, 1]), _heads(b, v, n, [0, 2, 1, 3]),
                  scale, additive, attn_bias)
    return [_merge_heads(b, out)]


def _onnx_attention(node, b, ctx):
    """ONNX Attention (opset 23/24): softmax(softcap(Q·√s · (K·√s)ᵀ) + mask)·V, 3-D or 4-D, GQA by repeating
    K/V heads, is_causal top-left aligned, bool masks True = attend, fully masked rows give zeros."""
    for i, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if _input(node, i) is not None:
            raise _fail(node, f"input '{name}'")
    _require_unused(node, (1, 2, 3), ("present_key", "present_value", "qk_matmul_output"))
    for name in ("left_window_size", "right_window_size"):
        if int(attr(node, name, -1)) != -1:
            raise _fail(node, f"attribute {name}")
    q, k, v, mask = (_input(node, i) for i in range(4))
    r = b.rank(q)
    if r not in (3, 4):
        raise _fail(node, f"a query of unknown rank ({r})")
    if r == 3:
        nq, nkv = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        if not nq or not nkv:
            raise _fail(node, "3-D inputs without q_num_heads / kv_num_heads")
        q4, k4, v4 = (_heads(b, q, nq, [0, 2, 1, 3]), _heads(b, k, nkv, [0, 2, 1, 3]), _heads(b, v, nkv, [0, 2, 1, 3]))
        head = b.dim(q, 2)
        head = head // nq if isinstance(head, int) else None
    else:
        q4, k4, v4 = q, k, v
        nq, nkv = b.dim(q, 1), b.dim(k, 1)
        head = b.dim(q, 3)
    if nq != nkv:
        if not (isinstance(nq, int) and isinstance(nkv, int) and nq % nkv == 0):
            raise _fail(node, "query and key/value head counts that are unknown or not multiples")
        k4, v4 = (_repeat_heads(b, t, nkv, nq // nkv) for t in (k4, v4))
    scale = attr(node, "scale")
    if scale is None:
        if not isinstance(head, int):
            raise _fail(node, "unknown head size without a scale attribute")
        scale = 1.0 / math.sqrt(head)
    root = b.scalar(math.sqrt(float(scale)))
    scores = b.MatMul(b.Mul(q4, root), b.Transpose(b.Mul(k4, root), perm=[0, 1, 3, 2]))
    softcap = float(attr(node, "softcap", 0.0))
    if softcap > 0:
        scores = b.Mul(b.Tanh(b.Div(scores, b.scalar(softcap))), b.scalar(softcap))
    additive = None
    if mask is not None:
        additive = b.Where(mask, b.scalar(0.0), b.scalar(-np.inf)) if mask.dtype == ir.DataType.BOOL else mask
    if attr(node, "is_causal", 0):
        causal = b.Where(_causal_allowed(b, q4, k4, 2, 2), b.scalar(0.0), b.scalar(-np.inf))
        additive = causal if additive is None else b.Add(additive, causal)
    if additive is not None:
        scores = b.Add(scores, additive)
    probs = b.Softmax(scores, axis=-1)
    if mask is not None:  # a row whose mask hides every key attends to nothing (the spec's zeros)
        full = b.Add(additive, b.Expand(b.scalar(0.0), b.Shape(scores)))
        dead = b.Equal(b.ReduceMax(full, b.i64([-1]), keepdims=1), b.scalar(-np.inf))
        probs = b.Where(dead, b.scalar(0.0), probs)
    out = b.MatMul(probs, v4)
    return [_merge_heads(b, out) if r == 3 else out]


def _repeat_heads(b, t, heads, reps):
    """[B, H, T, h] → [B, H·reps, T, h] with each head repeated in place (h0, h0, h1, h1, …)."""
    shape = b.Shape(t)
    batch, rest = b.Slice(shape, b.i64([0]), b.i64([1])), b.Slice(shape, b.i64([2]), b.i64([4]))
    expanded = b.Expand(b.Unsqueeze(t, b.i64([2])), b.Concat(batch, b.i64([heads, reps]), rest, axis=0))
    return b.Reshape(expanded, b.Concat(batch, b.i64([heads * reps]), rest, axis=0))


# ---- rotary embeddings ------------------------------------------------------------------------------

def _rotate(node, b, x, cos, sin, num_heads, rotary_dim, interleaved):
    """Rotate the first rotary_dim features of each head; x [B, S, H] or [B, N, S, h], cos/sin
    [B or 1, S, rotary_dim/2]. Strided slices are avoided (interleaved pairs via a reshape)."""
    r = b.rank(x)
    if r == 3:
        if not num_heads:
            raise _fail(node, "3-D input without num_heads")
        h = b.Reshape(x, b.i64([0, 0, num_heads, -1]))        # [B, S, N, h]
        cos, sin = (b.Unsqueeze(c, b.i64([2])) for c in (cos, sin))
    elif r == 4:
        h = x                                                  # [B, N, S, h]
        cos, sin = (b.Unsqueeze(c, b.i64([1])) for c in (cos, sin))
    else:
        raise _fail(node, f"input of rank {r}")
    head = b.dim(h, 3) if r == 4 else None
    if r == 3:
        hidden = b.dim(x, 2)
        head = hidden // num_heads if isinstance(hidden, int) else None
    rotary_dim = int(rotary_dim or 0) or head
    if not isinstance(rotary_dim, int):
        raise _fail(node, "unknown head size without rotary_embedding_dim")
    half = rotary_dim // 2
    partial = head is None or rotary_dim != head
    if partial:
        if head is None:
            raise _fail(node, "unknown head size with partial rotation")
        rot, keep = b.Split(h, b.i64([rotary_dim, head - rotary_dim]), axis=-1, _outputs=2)
    else:
        rot, keep = h, None
    if interleaved:
        pairs = b.Reshape(rot, b.Concat(b.Shape(rot, end=3), b.i64([half, 2]), axis=0))   # [..., half, 2]
        even, odd = b.Split(pairs, b.i64([1, 1]), axis=-1, _outputs=2)                     # [..., half, 1]
        x1, x2 = b.Reshape(even, b.Shape(even, end=4)), b.Reshape(odd, b.Shape(odd, end=4))
    else:
        x1, x2 = b.Split(rot, b.i64([half, half]), axis=-1, _outputs=2)
    real = b.Sub(b.Mul(cos, x1), b.Mul(sin, x2))
    imag = b.Add(b.Mul(sin, x1), b.Mul(cos, x2))
    if interleaved:
        both = b.Concat(b.Unsqueeze(real, b.i64([-1])), b.Unsqueeze(imag, b.i64([-1])), axis=-1)
        rotated = b.Reshape(both, b.Shape(rot))
    else:
        rotated = b.Concat(real, imag, axis=-1)
    if keep is not None:
        rotated = b.Concat(rotated, keep, axis=-1)
    return b.Reshape(rotated, b.Shape(x)) if r == 3 else rotated


def _onnx_rotary(node, b, ctx):
    """ONNX RotaryEmbedding-23: input, cos_cache, sin_cache, position_ids (optional)."""
    x, cos, sin, pos = (_input(node, i) for i in range(4))
    if pos is not None:
        cos, sin = b.Gather(cos, pos), b.Gather(sin, pos)
    return [_rotate(node, b, x, cos, sin, attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0),
                    attr(node, "interleaved", 0))]


def _ms_rotary(node, b, ctx):
    """com.microsoft RotaryEmbedding: input, position_ids ([B, S], or [1] = offset of 0..S-1), cos, sin."""
    if attr(node, "is_packed_batching", 0):
        raise _fail(node, "attribute is_packed_batching=1")
    if float(attr(node, "scale", 1.0)) != 1.0:
        raise _fail(node, "attribute scale≠1")
    x, pos, cos, sin = (_input(node, i) for i in range(4))
    r = b.rank(x)
    seq_axis = 1 if r == 3 else 2
    if b.rank(pos) == 1:
        pos = b.Unsqueeze(b.Add(b.Range(b.i64(0), b.dim_scalar(x, seq_axis), b.i64(1)),
                                b.Cast(pos, to=ir.DataType.INT64)), b.i64([0]))
    cos, sin = b.Gather(cos, pos), b.Gather(sin, pos)
    return [_rotate(node, b, x, cos, sin, attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0),
                    attr(node, "interleaved", 0))]


def _refuse(reason):
    def handler(node, b, ctx):
        raise _fail(node, reason)
    return handler


# ---- the table --------------------------------------------------------------------------------------

HANDLERS = {
    (MS, "SkipLayerNormalization"): _skip_layer_norm,
    (MS, "SkipSimplifiedLayerNormalization"): _skip_simplified_layer_norm,
    (MS, "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    (PROTECTED_DOMAIN, "SimplifiedLayerNormalization"): _simplified_layer_norm,
    (MS, "EmbedLayerNormalization"): _embed_layer_norm,
    (MS, "BiasGelu"): _bias_gelu,
    (MS, "Gelu"): _bias_gelu,
    (MS, "FastGelu"): _bias_gelu,
    (MS, "QuickGelu"): _quick_gelu,
    (MS, "BiasSplitGelu"): _bias_split_gelu,
    (MS, "BiasAdd"): _bias_add,
    (MS, "Attention"): _ms_attention,
    (MS, "MultiHeadAttention"): _ms_multi_head_attention,
    (MS, "RotaryEmbedding"): _ms_rotary,
    (MS, "GroupQueryAttention"): _refuse("GroupQueryAttention (a generation op with a key/value cache)"),
    ("", "Attention"): _onnx_attention,
    ("", "RotaryEmbedding"): _onnx_rotary,
}
# Standard ops decomposed only while the rule table cannot differentiate them.
CONDITIONAL = {("", "RMSNormalization"): _simplified_layer_norm}


def _handler(node: ir.Node):
    domain = "" if node.domain == "ai.onnx" else node.domain
    key = (domain, node.op_type)
    if key in HANDLERS:
        return HANDLERS[key]
    if key in CONDITIONAL and node.op_type not in rules.VJP:
        return CONDITIONAL[key]
    return None


class _Context:
    def __init__(self, model: ir.Model):
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))


def decompose_fused(model: ir.Model) -> ir.Model:
    """Rewrite every fused op of the table into standard ONNX ops, in place; returns the model."""
    graph = model.graph
    targets = [(node, h) for node in graph if (h := _handler(node)) is not None]
    if not targets:
        return model
    ctx = _Context(model)
    b = _Inserter(graph)
    b.model = model
    for node, handler in targets:
        b.anchor = node
        b.dtype = _float_type(node, *range(len(node.inputs)))
        replacements = handler(node, b, ctx)
        for i, old in enumerate(node.outputs):
            new = replacements[i] if i < len(replacements) else None
            if not _used(old):
                continue
            if new is None:
                raise _fail(node, f"its output {i} being used")
            name = old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            if name:
                old.name = None
                new.name = name   # the model keeps its output names (and its readable tensor names)
            if old.shape is not None and new.shape is None:
                new.shape = old.shape
            if old.dtype is not None and new.dtype is None:
                new.dtype = old.dtype
        graph.remove(node, safe=True)
        b.dirty = True
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model


def protect_nonstandard_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Before canonicalize: make an onnxruntime-optimised model acceptable to onnx's version converter
    (opset < 18). ORT-only ops registered in the ONNX domain (SimplifiedLayerNormalization) move to a private
    domain that `decompose_fused` handles, and a missing com.microsoft opset import (the in-memory model of
    `optimize_model(..., opt_level=0)` has none) is added. Returns a copy when anything changed."""
    moved = any(n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS for n in proto.graph.node)
    imported = {o.domain for o in proto.opset_import}
    missing_ms = MS not in imported and any(n.domain == MS for n in proto.graph.node)
    if not moved and not missing_ms:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    if missing_ms:
        copy.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    if moved:
        for n in copy.graph.node:
            if n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS:
                n.domain = PROTECTED_DOMAIN
        if PROTECTED_DOMAIN not in imported:
            copy.opset_import.append(onnx.helper.make_opsetid(PROTECTED_DOMAIN, 1))
    return copy
