"""Decompositions of fused attention and rotary embeddings (see lrpc.decompose)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from lrpc.fused_common import LOWEST, fail, optional_input, output_used, require_unused
from lrpc.graph import attr


def _heads(b, x, num_heads, perm):
    """[B, S, N·h] → [B, N, S, h] (perm (0, 2, 1, 3)) or Kᵀ [B, N, h, S] (perm (0, 2, 3, 1))."""
    return b.Transpose(b.Reshape(x, b.i64([0, 0, num_heads, -1])), perm=perm)


def _merge_heads(b, ctx_bnsh):
    return b.Reshape(b.Transpose(ctx_bnsh, perm=[0, 2, 1, 3]), b.i64([0, 0, -1]))


def _ort_mask(node, b, mask, query, key, causal: bool, filter_value: float, k_axis=1, offset=None):
    """The additive mask onnxruntime's CPU attention builds (PrepareMask): key positions a mask hides get
    mask_filter_value; with unidirectional=1 the future gets the float32 lowest (it overrides the mask). The
    keys lie along `k_axis` of `key`; `offset`: the length of a past cache before the queries.
    Returns a tensor broadcastable to [B, N, S, T] (or None)."""
    zero, hidden = b.scalar(0.0), b.scalar(filter_value)
    additive = None
    if mask is not None:
        r = b.rank(mask)
        if r is None:
            raise fail(node, "a mask of unknown rank")
        if r == 1:
            t = b.dim_scalar(key, k_axis)
            positions = b.Unsqueeze(b.Range(b.i64(0), t, b.i64(1)), b.i64([0]))      # [1, T]
            m = b.Cast(mask, to=ir.DataType.INT64)
            batch_dim, mask_dim = b.dim(query, 0), b.dim(mask, 0)
            two_b = isinstance(batch_dim, int) and isinstance(mask_dim, int) and mask_dim == 2 * batch_dim
            if isinstance(batch_dim, int) and isinstance(mask_dim, int) and mask_dim not in (batch_dim, 2 * batch_dim):
                raise fail(node, f"a 1-D mask_index of length {mask_dim} (3·batch+2 form)")
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
            raise fail(node, f"a {r}-D mask_index")
        additive = b.Where(allowed, zero, hidden)
    if causal:
        future_ok = _causal_allowed(b, query, key, k_axis=k_axis, offset=offset)
        additive = b.Where(future_ok, additive if additive is not None else zero, b.scalar(LOWEST))
    return additive


def _int_zero(b, mask):
    return b.const(np.asarray(0, dtype=mask.dtype.numpy() if mask.dtype is not None else np.int32))


def _positions(b, query, key, q_axis=1, k_axis=1, offset=None):
    """([S, 1], [1, T]) int64: query i's position i + offset (the length of a past cache, or a per-batch
    [B, 1, 1, 1] one, which makes the first [B, 1, S, 1]; none: 0), key j's j."""
    i = b.Unsqueeze(b.Range(b.i64(0), b.dim_scalar(query, q_axis), b.i64(1)), b.i64([1]))
    j = b.Unsqueeze(b.Range(b.i64(0), b.dim_scalar(key, k_axis), b.i64(1)), b.i64([0]))
    return i if offset is None else b.Add(i, offset), j


def _causal_allowed(b, query, key, q_axis=1, k_axis=1, offset=None):
    """[S, T] bool: key j visible from query i iff j ≤ i + offset."""
    i, j = _positions(b, query, key, q_axis, k_axis, offset)
    return b.LessOrEqual(j, i)


def _window_allowed(b, query, key, offset, left: int, right: int):
    """[S, T] bool: p − left ≤ j ≤ p + right for query position p = i + offset (a bound of −1: none)."""
    p, j = _positions(b, query, key, 2, 2, offset)
    allowed = [b.LessOrEqual(b.Sub(p, j), b.i64(left))] if left >= 0 else []
    allowed += [b.LessOrEqual(b.Sub(j, p), b.i64(right))] if right >= 0 else []
    return allowed[0] if len(allowed) == 1 else b.And(*allowed)


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
        raise fail(node, "merged QKV weights of unknown width without qkv_hidden_sizes")
    return [width // 3] * 3


def _head_size(node, hidden: int, num_heads: int) -> int:
    if hidden % num_heads:
        raise fail(node, f"hidden size {hidden} not divisible by num_heads={num_heads}")
    return hidden // num_heads


def ms_attention(node, b, ctx):
    """com.microsoft Attention: QKV = X·W (+ bias), per-head softmax(Q·Kᵀ·scale + mask (+ bias))·V, after a past
    key/value state."""
    if optional_input(node, 6) is not None:
        raise fail(node, "input 'past_sequence_length' (a shared key/value buffer)")
    return self_attention(node, b, *(optional_input(node, i) for i in (0, 1, 2, 3, 5, 4)))


def self_attention(node, b, x, w, bias, mask, attn_bias, past=None):
    """com.microsoft Attention's computation (also QAttention's, on its dequantized input and weight; the
    attributes are the node's). A past state [2, B, N, P, h] goes before this step's keys and values (present is
    both, [2, B, N, P + S, h]); the queries are positions P…P+S−1 for the causal mask."""
    for name in ("do_rotary", "past_present_share_buffer"):
        if attr(node, name, 0):
            raise fail(node, f"attribute {name}=1")
    n = int(attr(node, "num_heads"))
    sizes = _qkv_sizes(node, b, w)
    head = _head_size(node, sizes[0], n)
    _head_size(node, sizes[2], n)
    scale = float(attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head)
    qkv = b.MatMul(x, w)
    if bias is not None:
        qkv = b.Add(qkv, bias)
    q, k, v = b.Split(qkv, b.i64(sizes), axis=-1, _outputs=3)
    causal, filter_value = bool(attr(node, "unidirectional", 0)), float(attr(node, "mask_filter_value", -10000.0))
    present = None
    if past is None and not output_used(node, 1):
        kt, v = _heads(b, k, n, [0, 2, 3, 1]), _heads(b, v, n, [0, 2, 1, 3])
        additive = _ort_mask(node, b, mask, x, x, causal, filter_value)
    else:
        k, v = _heads(b, k, n, [0, 2, 1, 3]), _heads(b, v, n, [0, 2, 1, 3])
        if past is not None:
            past_k, past_v = (b.Squeeze(half, b.i64([0])) for half in b.Split(past, num_outputs=2, axis=0, _outputs=2))
            k, v = b.Concat(past_k, k, axis=2), b.Concat(past_v, v, axis=2)
        present = b.Concat(b.Unsqueeze(k, b.i64([0])), b.Unsqueeze(v, b.i64([0])), axis=0)
        kt = b.Transpose(k, perm=[0, 1, 3, 2])
        additive = _ort_mask(node, b, mask, x, k, causal, filter_value, k_axis=2,
                             offset=None if past is None else b.dim_scalar(past, 3))
    out = _attend(b, _heads(b, q, n, [0, 2, 1, 3]), kt, v, scale, additive, attn_bias)
    return [_merge_heads(b, out), present]


def ms_multi_head_attention(node, b, ctx):
    """com.microsoft MultiHeadAttention with separate 3-D query / key / value (no past, not packed)."""
    for i, name in ((6, "past_key"), (7, "past_value"), (8, "past_sequence_length"), (9, "cache_indirection")):
        if optional_input(node, i) is not None:
            raise fail(node, f"input '{name}'")
    require_unused(node, (1, 2, 3), ("present_key", "present_value", "qk"))
    q, k, v, bias, mask, attn_bias = (optional_input(node, i) for i in range(6))
    if k is None or v is None:
        raise fail(node, "packed QKV / KV input (key or value absent)")
    for value, name in ((q, "query"), (k, "key"), (v, "value")):
        if b.rank(value) != 3:
            raise fail(node, f"{name} of rank {b.rank(value)} (only [batch, sequence, hidden] is handled)")
    n = int(attr(node, "num_heads"))
    if bias is not None:
        width = b.dim(bias, 0)
        hq, hv = b.dim(q, 2), b.dim(v, 2)
        if not all(isinstance(d, int) for d in (width, hq, hv)):
            raise fail(node, "a bias with unknown hidden sizes")
        bq, bk, bv = b.Split(bias, b.i64([hq, width - hq - hv, hv]), axis=0, _outputs=3)
        q, k, v = b.Add(q, bq), b.Add(k, bk), b.Add(v, bv)
    hq = b.dim(node.inputs[0], 2)
    head = _head_size(node, hq, n) if isinstance(hq, int) else None
    scale = float(attr(node, "scale", 0.0))
    if not scale:
        if head is None:
            raise fail(node, "unknown head size without a scale attribute")
        scale = 1.0 / math.sqrt(head)
    additive = _ort_mask(node, b, mask, node.inputs[0], node.inputs[1], bool(attr(node, "unidirectional", 0)),
                         float(attr(node, "mask_filter_value", -10000.0)))
    out = _attend(b, _heads(b, q, n, [0, 2, 1, 3]), _heads(b, k, n, [0, 2, 3, 1]), _heads(b, v, n, [0, 2, 1, 3]),
                  scale, additive, attn_bias)
    return [_merge_heads(b, out)]


def onnx_attention(node, b, ctx):
    """ONNX Attention (opset 23/24): softmax(softcap(Q·√s · (K·√s)ᵀ) + mask)·V, 3-D or 4-D, GQA by repeating
    K/V heads, is_causal and sliding windows aligned to the end of a past cache (top-left without one), bool
    masks True = attend, fully masked rows give zeros. A past key/value cache is concatenated in front of K/V
    (present_key / present_value); qk_matmul_output is the scaled Q·Kᵀ (mode 0), softcapped (1), plus the mask
    (2), or the softmax (3)."""
    mode = int(attr(node, "qk_matmul_output_mode", 0))
    left, right = int(attr(node, "left_window_size", -1)), int(attr(node, "right_window_size", -1))
    q, k, v, mask, past_key, past_value, nonpad = (optional_input(node, i) for i in range(7))
    if (past_key is None) != (past_value is None) or (past_key is not None and nonpad is not None):
        raise fail(node, "only one of past_key / past_value, or a past cache with nonpad_kv_seqlen")
    r = b.rank(q)
    if r not in (3, 4):
        raise fail(node, f"a query of unknown rank ({r})")
    if r == 3:
        nq, nkv = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        if not nq or not nkv:
            raise fail(node, "3-D inputs without q_num_heads / kv_num_heads")
        q4, k4, v4 = (_heads(b, q, nq, [0, 2, 1, 3]), _heads(b, k, nkv, [0, 2, 1, 3]), _heads(b, v, nkv, [0, 2, 1, 3]))
        head = b.dim(q, 2)
        head = head // nq if isinstance(head, int) else None
    else:
        q4, k4, v4 = q, k, v
        nq, nkv = b.dim(q, 1), b.dim(k, 1)
        head = b.dim(q, 3)
    if past_key is not None:   # the cache is [B, kv heads, past, head] whatever the rank of Q/K/V
        k4, v4 = b.Concat(past_key, k4, axis=2), b.Concat(past_value, v4, axis=2)
    present = (k4, v4) if past_key is not None else (None, None)
    if nq != nkv:
        if not (isinstance(nq, int) and isinstance(nkv, int) and nq % nkv == 0):
            raise fail(node, "query and key/value head counts that are unknown or not multiples")
        k4, v4 = (_repeat_heads(b, t, nkv, nq // nkv) for t in (k4, v4))
    scale = attr(node, "scale")
    if scale is None:
        if not isinstance(head, int):
            raise fail(node, "unknown head size without a scale attribute")
        scale = 1.0 / math.sqrt(head)
    root = b.scalar(math.sqrt(float(scale)))
    scores = qk = b.MatMul(b.Mul(q4, root), b.Transpose(b.Mul(k4, root), perm=[0, 1, 3, 2]))
    softcap = float(attr(node, "softcap", 0.0))
    if softcap > 0:
        scores = b.Mul(b.Tanh(b.Div(scores, b.scalar(softcap))), b.scalar(softcap))
    capped, additive = scores, None
    if mask is not None:
        additive = b.Where(mask, b.scalar(0.0), b.scalar(-np.inf)) if mask.dtype == ir.DataType.BOOL else mask
        keys, given = b.dim(k4, 2), b.dim(mask, -1)
        if isinstance(keys, int) and isinstance(given, int) and given < keys:   # the spec pads it with -inf
            additive = b.Pad(additive, b.i64([0] * (2 * b.rank(mask) - 1) + [keys - given]), b.scalar(-np.inf))
    offset = b.dim_scalar(past_key, 2) if past_key is not None else None
    if nonpad is not None:   # an external cache: batch row n holds nonpad[n] valid keys, the queries last
        valid = b.Reshape(nonpad, b.i64([-1, 1, 1, 1]))
        offset = b.Sub(valid, b.dim_scalar(q4, 2))
    allowed = [_causal_allowed(b, q4, k4, 2, 2, offset)] if attr(node, "is_causal", 0) else []
    allowed += [_window_allowed(b, q4, k4, offset, left, right)] if left >= 0 or right >= 0 else []
    allowed += [b.Less(_positions(b, q4, k4, 2, 2)[1], valid)] if nonpad is not None else []
    for visible in allowed:
        bias = b.Where(visible, b.scalar(0.0), b.scalar(-np.inf))
        additive = bias if additive is None else b.Add(additive, bias)
    if additive is not None:
        scores = b.Add(scores, additive)
    probs = b.Softmax(scores, axis=-1)
    if mask is not None or left >= 0 or right >= 0 or nonpad is not None:
        # a row whose mask hides every key attends to nothing (the spec's zeros)
        full = b.Add(additive, b.Expand(b.scalar(0.0), b.Shape(scores)))
        dead = b.Equal(b.ReduceMax(full, b.i64([-1]), keepdims=1), b.scalar(-np.inf))
        probs = b.Where(dead, b.scalar(0.0), probs)
    out = b.MatMul(probs, v4)
    qk_output = None
    if output_used(node, 3):   # the spec's modes, as onnx's reference and onnxruntime (≥ 1.32) compute them
        qk_output = {0: qk, 1: capped, 2: scores, 3: probs}.get(mode)
        if qk_output is None:
            raise fail(node, f"qk_matmul_output_mode={mode}")
    return [_merge_heads(b, out) if r == 3 else out, *present, qk_output]


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
            raise fail(node, "3-D input without num_heads")
        h = b.Reshape(x, b.i64([0, 0, num_heads, -1]))        # [B, S, N, h]
        cos, sin = (b.Unsqueeze(c, b.i64([2])) for c in (cos, sin))
    elif r == 4:
        h = x                                                  # [B, N, S, h]
        cos, sin = (b.Unsqueeze(c, b.i64([1])) for c in (cos, sin))
    else:
        raise fail(node, f"input of rank {r}")
    head = b.dim(h, 3) if r == 4 else None
    if r == 3:
        hidden = b.dim(x, 2)
        head = hidden // num_heads if isinstance(hidden, int) else None
    rotary_dim = int(rotary_dim or 0) or head
    if not isinstance(rotary_dim, int):
        raise fail(node, "unknown head size without rotary_embedding_dim")
    half = rotary_dim // 2
    partial = head is None or rotary_dim != head
    if partial:
        if head is None:
            raise fail(node, "unknown head size with partial rotation")
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


def onnx_rotary(node, b, ctx):
    """ONNX RotaryEmbedding-23: input, cos_cache, sin_cache, position_ids (optional)."""
    x, cos, sin, pos = (optional_input(node, i) for i in range(4))
    if pos is not None:
        cos, sin = b.Gather(cos, pos), b.Gather(sin, pos)
    return [_rotate(node, b, x, cos, sin, attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0),
                    attr(node, "interleaved", 0))]


def ms_rotary(node, b, ctx):
    """com.microsoft RotaryEmbedding: input, position_ids ([B, S], or [1] = offset of 0..S-1), cos, sin."""
    if attr(node, "is_packed_batching", 0):
        raise fail(node, "attribute is_packed_batching=1")
    if float(attr(node, "scale", 1.0)) != 1.0:
        raise fail(node, "attribute scale≠1")
    x, pos, cos, sin = (optional_input(node, i) for i in range(4))
    r = b.rank(x)
    seq_axis = 1 if r == 3 else 2
    if b.rank(pos) == 1:
        pos = b.Unsqueeze(b.Add(b.Range(b.i64(0), b.dim_scalar(x, seq_axis), b.i64(1)),
                                b.Cast(pos, to=ir.DataType.INT64)), b.i64([0]))
    cos, sin = b.Gather(cos, pos), b.Gather(sin, pos)
    return [_rotate(node, b, x, cos, sin, attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0),
                    attr(node, "interleaved", 0))]


def refuse(reason):
    def handler(node, b, ctx):
        raise fail(node, reason)
    return handler
