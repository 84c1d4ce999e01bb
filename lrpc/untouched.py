"""The model's outputs from an untouched copy of its forward (docs/design.md, "Explainer contract").

onnxruntime does not run a graph as written: at its extended level it fuses float32 groups (Add +
LayerNormalization → SkipLayerNormalization, Add + Gelu → BiasGelu, …), it fuses quantized ops
(DynamicQuantizeLinear + MatMulInteger + Cast + Mul → MatMulIntegerToFloat, QDQ groups → QLinearMatMul, …)
and, on CPU, runs float16 ops in float32, skipping the float16 rounding of a tensor that only its own
inserted casts read. A tensor the relevance pass reads gains a consumer, which blocks the fusion or forces
the rounding there, so the outputs would move (by an ulp, or for QDQ by a quantization step).

So the explainer keeps the forward twice: the relevance pass reads the forward it was compiled on, and the
model's outputs come from a copy of the forward that nothing else reads, so onnxruntime transforms it
exactly as it transforms the model itself, at every optimisation level. The copy reads each model input
through `Where(x == x, x, x)` (the value itself, bit for bit, NaN included; `x | x` for the integer types
onnxruntime's Where lacks, `x or x` for bool), which no onnxruntime rewrite
removes, so its nodes can never be merged with the other forward's (common-subexpression elimination),
except the constant ones, which are the same either way; its float16 / bfloat16 weights are its own
(`_own_weight`); and where lrpc replaced an onnxruntime contrib op (SkipLayerNormalization, BiasGelu, …) by its
decomposition, the copy runs the contrib op again (`remember`), as the model does. It costs one more forward per run, so by default only quantized and float16 / bfloat16 models get it
(`needed`); float32 models get it with `lrpc compile --forward copy`. A model with subgraphs (If, Loop, Scan)
is not copied.
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import ops
from lrpc.graph import Builder

REDUCED = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
PREFIX = "lrp_forward."
REPLACED = "lrpc.replaced"   # graph.meta key: the contrib nodes lrpc.decompose replaced (`remember`)


def remember(graph: ir.Graph, node: ir.Node, replacements: list[ir.Value | None]) -> None:
    """Record a contrib node that lrpc.decompose replaces by its decomposition (`replacements`, one per output),
    so that the untouched copy runs the node itself: its decomposition is within float32 rounding of it, and at
    onnxruntime's basic level (which fuses nothing back) the outputs would be an ulp off."""
    attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    graph.meta.setdefault(REPLACED, []).append(
        (node.domain, node.op_type, node.version, node.name, attributes, list(node.inputs), list(replacements)))


def needed(graph: ir.Graph, mode: str = "auto") -> bool:
    """Whether the outputs come from the untouched copy (`forward=` of lrpc.compile): `copy` always, `shared`
    never, `auto` for quantized and float16 / bfloat16 models, where a shared forward would be off by a
    quantization step or an ulp; a float32 model's shared forward stays within float32 rounding (onnxruntime
    fuses less of it) and a copy would cost one more forward per run. A model with subgraphs (If, Loop,
    Scan) is never copied."""
    nodes = list(graph)
    if mode == "shared" or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                               for node in nodes for a in node.attributes.values()):
        return False
    return mode == "copy" or any(ops.is_quantized(node) or any(o.dtype in REDUCED for o in node.outputs)
                                 for node in nodes)


def forward_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The forward to copy, taken before the relevance pass is added: every node but those of fused ops'
    decompositions (lrpc.decompose) that the model's outputs do not need — the relevance pass reads them,
    the copy would only make onnxruntime run them."""
    nodes = list(graph)
    skipped = _decomposition_only(nodes, list(graph.outputs))
    return [node for node in nodes if node not in skipped]


def _decomposition_only(forward: list[ir.Node], model_outputs: list[ir.Value]) -> set[ir.Node]:
    def producers(values, stop=frozenset()):
        found, stack = set(), [v.producer() for v in values if v is not None]
        while stack:
            node = stack.pop()
            if node is None or node in found or node in stop:
                continue
            found.add(node)
            stack.extend(v.producer() for v in node.inputs if v is not None)
        return found
    needed = producers(model_outputs)
    targets = [v for node in forward for v in node.meta.get(ops.ALIAS) or ()]
    return producers(targets, stop=needed)


WHERE_LACKS = (ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.UINT64)   # onnxruntime has no Where kernel


def _opaque(b: Builder, value: ir.Value) -> ir.Value:
    """The value itself through an op no onnxruntime rewrite removes: Where(x == x, x, x), or x | x (x or x for
    bool) for the types onnxruntime's Where lacks."""
    if value.dtype == ir.DataType.BOOL:
        return b.Or(value, value)
    if value.dtype in WHERE_LACKS:
        return b.BitwiseOr(value, value)
    return b.Where(b.Equal(value, value), value, value)


def attach(graph: ir.Graph, forward: list[ir.Node], model_outputs: list[ir.Value]) -> None:
    """Give `model_outputs` (made by the `forward` nodes) to a copy of those nodes that reads the model
    inputs through an opaque identity; the originals keep their nodes under a `lrp_forward.` name."""
    b = Builder(graph)
    copies: dict[ir.Value, ir.Value] = {}
    for value in graph.inputs:
        copies[value] = _opaque(b, value)
        copies[value].dtype, copies[value].shape = value.dtype, value.shape
    forward = set(forward)
    for value in list(graph.initializers.values()):   # weights of its own: see `_own_weight`
        if value.dtype in REDUCED and value not in copies and any(user in forward for user, _ in value.uses()):
            copies[value] = _own_weight(graph, value)
    for node in [n for n in graph if n in forward]:   # (lrpc.optimise may have merged or removed some)
        inputs = [None if v is None else copies.get(v, v) for v in node.inputs]
        attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        copy = ir.Node(node.domain, node.op_type, inputs, attributes, num_outputs=len(node.outputs),
                       version=node.version, name=PREFIX + (node.name or ""))
        graph.append(copy)
        for old, new in zip(node.outputs, copy.outputs):
            new.name = PREFIX + (old.name or "")
            if old.dtype is not None:   # (a custom op's output may have no known type)
                new.dtype, new.shape = old.dtype, old.shape
            copies[old] = new
    copied = set(copies.values())
    _replaced_back(graph, copies)
    for i, value in enumerate(list(graph.outputs)):
        if value in model_outputs and value.producer() is not None:   # (a model input passed through stays)
            name, copy = value.name, copies[value]
            value.name, copy.name = PREFIX + name, name
            graph.outputs[i] = copy
    for node in reversed(list(graph)):   # copied decompositions no copy reads any more (`_replaced_back`)
        if any(o in copied for o in node.outputs) and not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)
    graph.sort()


def _replaced_back(graph: ir.Graph, copies: dict[ir.Value, ir.Value]) -> None:
    """In the copy, each remembered contrib node takes its decomposition's place (the copies of its replacements
    are read from the node instead; `attach` drops the copied decomposition left unread). A node whose inputs or
    replacements the copy no longer has (lrpc.optimise merged them) keeps its decomposition."""
    for domain, op_type, version, name, attributes, inputs, replacements in graph.meta.get(REPLACED, ()):
        if not all(v is None or v in copies or v.is_initializer() for v in inputs) \
                or not any(v in copies for v in replacements if v is not None) \
                or not _reads_only(replacements, inputs):
            continue
        node = ir.Node(domain, op_type, [None if v is None else copies.get(v, v) for v in inputs], attributes,
                       num_outputs=len(replacements), version=version, name=PREFIX + (name or ""))
        graph.append(node)
        for new, out in zip(replacements, node.outputs):
            if new in copies:
                name, copies[new].name = copies[new].name, None
                out.name, out.dtype, out.shape = name, copies[new].dtype, copies[new].shape
                copies[new].replace_all_uses_with(out)
                copies[new] = out


def _reads_only(replacements: list[ir.Value | None], inputs: list[ir.Value | None]) -> bool:
    """Whether the decomposition still computes its outputs from the node's inputs (and constants) alone: not
    where --embeddings-input put a model input in place of its lookup (lrpc.embeddings)."""
    bound, seen = {v for v in inputs if v is not None}, set()
    stack = [v for v in replacements if v is not None]
    while stack:
        value = stack.pop()
        if value in bound or value in seen or value.is_initializer():
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None:   # a model input the node does not read
            return False
        stack.extend(v for v in producer.inputs if v is not None)
    return True


def _own_weight(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """A second initializer holding `value`'s tensor, for the copy alone. A weight both forwards read
    differs from the model's where onnxruntime looks: on CPU it casts a float16 weight to float32 once
    for all its readers and folds that cast back into an initializer only when one node reads it
    (FuseInitializersTransformer), and the fusions after it (e.g. a bias into SkipLayerNormalization,
    which changes the order of the additions) need that initializer."""
    own = ir.Value(name=PREFIX + value.name, type=value.type, shape=value.shape, const_value=value.const_value)
    graph.register_initializer(own)
    return own
