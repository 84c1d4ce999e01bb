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

Unsupported attribute combinations (onnxruntime's attention ops with a past key/value cache, packed layouts,
rotary inside Attention, …) raise LrpcError naming the node, the op and the attribute. ONNX ops defined by a
function body and without a row of their own are expanded into that body (lrpc.fused_function).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from lrpc import ops, untouched
from lrpc.fused_common import MS, PROTECTED_DOMAIN, Inserter, fail, float_type, used

# Default-domain op names that only onnxruntime knows (registered by ORT in the ONNX domain): the registry's
# fused ops of the protected domain.
ORT_DEFAULT_DOMAIN_OPS = {op for domain, op in ops.FUSED_KEYS if domain == PROTECTED_DOMAIN}


class _Context:
    def __init__(self, model: ir.Model):
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
        self.opsets = dict(model.opset_imports)


def decompose_fused(model: ir.Model) -> ir.Model:
    """Rewrite every fused op of the registry (lrpc.ops.FUSED) into standard ONNX ops, in place; what a
    decomposition inserts is decomposed in turn (a function body holding a Scan, or another function op)."""
    graph = model.graph
    ctx = _Context(model)
    b = Inserter(graph)
    b.model = model
    seen: set[ir.Node] = set()
    untyped = []   # kept contrib nodes (pre-fused quantized ops): onnx cannot type their outputs
    while targets := [(node, h) for node in graph
                      if node not in seen and (h := ops.decomposition(node, ctx.opsets)) is not None]:
        seen.update(node for node, _ in targets)
        for node, handler in targets:
            if _decompose(node, handler, b, ctx) and node.domain not in ("", "ai.onnx"):
                untyped.append(node)
    if b.changed:
        graph.sort()   # (a decomposition may read a dequantized tensor the model makes after the fused node)
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        while _typed_like_decomposition(untyped):   # each round types what the nodes typed last round made
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model


def _typed_like_decomposition(nodes: list[ir.Node]) -> bool:
    """Give kept contrib nodes' untyped outputs the type and shape of their decomposition's outputs (the same
    tensor, recomputed); True when any changed."""
    changed = False
    for node in nodes:
        for old, new in zip(node.outputs, node.meta[ops.ALIAS]):
            if new is not None and new.dtype is not None and (old.dtype is None or old.shape is None) \
                    and new.shape is not None:
                old.dtype, old.shape = new.dtype, new.shape
                changed = True
    return changed


def _decompose(node: ir.Node, handler, b: Inserter, ctx: _Context) -> bool:
    """Decompose one node; True when the node is kept beside its decomposition (ops.ALIAS)."""
    b.anchor = node
    b.dtype = float_type(node, *range(len(node.inputs)))
    replacements = handler(node, b, ctx)
    if replacements is None:   # nothing to decompose here (the op's rule decides what to do)
        return False
    replacements = list(replacements)
    replacements += [None] * (len(node.outputs) - len(replacements))
    for i, (old, new) in enumerate(zip(node.outputs, replacements)):
        if used(old) and new is None:
            raise fail(node, f"its output {i} being used")
        if new is not None:   # (only what is known: a `dtype = None` would write an untypable Tensor(None))
            if new.shape is None and old.shape is not None:
                new.shape = old.shape
            if new.dtype is None and old.dtype is not None:
                new.dtype = old.dtype
    b.dirty = b.changed = True
    if node.domain in ("", "ai.onnx") or ops.is_quantized(node):
        # An ONNX op or a pre-fused quantized one: the node keeps computing the model's outputs (bit for bit
        # what onnxruntime's kernel gives); its decomposition, read by nothing in the forward, carries the
        # relevance (ops.ALIAS).
        node.meta[ops.ALIAS] = replacements
        _typed_like_decomposition([node])   # (now: a later node of this round may read its rank, as QAttention
        return True                         # reads QEmbedLayerNormalization's mask_index)
    # onnxruntime's contrib ops (whose outputs onnx cannot type) and other domains' ops (optimizer steps, which
    # onnxruntime cannot run) are replaced by their decomposition; an untouched copy of the forward runs the
    # contrib op itself again (untouched.remember)
    if node.domain == MS:
        untouched.remember(b.graph, node, replacements)
    for old, new in zip(node.outputs, replacements):
        if not used(old):
            continue
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if name:
            old.name = None
            new.name = name   # the model keeps its output names (and its readable tensor names)
    b.graph.remove(node, safe=True)
    return False


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
