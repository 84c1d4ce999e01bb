"""Which tensors carry relevance, and where each attributed input enters the graph.

A tensor carries relevance when it depends differentiably on an attributed input: the output of
an embedding lookup on token ids, or a float model input (docs/design.md, "Pipeline"). Weights, masks,
positions, shapes and rotary tables do not: for the rules they are constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lrpc import ops
from lrpc.errors import LrpcError
from lrpc.graph import const_array, is_float, outer_captures

# Ops that carry integer ids unchanged in value from a model input to an embedding lookup.
ID_PATH_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Identity", "Expand", "CastLike"}


@dataclass
class Attribution:
    """One attributed model input and the tensors whose relevance becomes its relevance."""

    input: ir.Value
    kind: str  # "token": ids feeding embedding lookups; "float": the input itself
    points: list[ir.Value] = field(default_factory=list)


def vocabulary(attribution: Attribution) -> int | None:
    """Rows of the embedding tables that token ids index directly (the fewest, if several), else None."""
    if attribution.kind != "token":
        return None
    lookups = [p.producer() for p in attribution.points]   # (an exposed embedding, --embeddings-input, has none)
    rows = [node.inputs[0].shape[0] for node in lookups
            if node is not None and node.op_type == "Gather" and node.inputs[1] is attribution.input
            and node.inputs[0].shape is not None and isinstance(node.inputs[0].shape[0], int)]
    return min(rows) if rows else None


def embedding_lookups(graph: ir.Graph, ids: ir.Value) -> list[ir.Value]:
    """Outputs of the Gathers from a float constant table reached from `ids` along an id path."""
    found, frontier, seen = [], [ids], set()
    while frontier:
        value = frontier.pop()
        for node, index in value.uses():
            if node in seen:
                continue
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
                table = node.inputs[0]
                looked_up = [node.outputs[0]] if is_float(table) else _dequantized(node.outputs[0])
                if looked_up and _constant_table(table):
                    seen.add(node)
                    found.extend(looked_up)
            elif node.op_type in ID_PATH_OPS and index == 0 and node.domain in ("", "ai.onnx"):
                seen.add(node)
                frontier.append(node.outputs[0])
    return found


def _dequantized(value: ir.Value) -> list[ir.Value]:
    """The float embedding of rows looked up in a quantized table: the DequantizeLinear that reads the lookup
    (onnxruntime's quantizers quantize embedding tables so); a pre-fused quantized reader (QLinearAdd) keeps
    the forward and has its own in its decomposition (lrpc/fused_quant.py), so there may be several, each
    the same values (their relevance is summed)."""
    uses = [(node, i) for node, i in value.uses() if not ops.is_kind(node, ops.FUSED)]
    if uses and all(node.op_type == "DequantizeLinear" and i == 0 for node, i in uses):
        return [node.outputs[0] for node, _ in uses]
    return []


def dequantized_once(value: ir.Value) -> ir.Value:
    """`value`, or for one of several identical DequantizeLinear of one tensor (same inputs and attributes) the
    copy named first: the tensor all of them stand for. onnxruntime's QDQ optimiser gives each reader of a
    dequantized tensor a DequantizeLinear of its own (`…/duplicated`, so that each QDQ group fuses on its own);
    the passes see the copies as one tensor (an RMSNorm's statistic and its scaled input read two copies of
    the embedding, a SiLU's Sigmoid and Mul two copies of its input)."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return value
    settings = {name: a.value for name, a in node.attributes.items()}
    copies = [reader.outputs[0] for reader, index in node.inputs[0].uses()
              if index == 0 and reader.op_type == node.op_type and reader.domain == node.domain
              and list(reader.inputs) == list(node.inputs)
              and {name: a.value for name, a in reader.attributes.items()} == settings]
    return min(copies, key=lambda v: v.name or "")


def _constant_table(table: ir.Value) -> bool:
    """A constant table, or one dequantized from a constant (quantize_static's QDQ format)."""
    producer = table.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        table = producer.inputs[0]
    return const_array_is_known(table)


def const_array_is_known(value: ir.Value) -> bool:
    """True for initializers (inline or external) and Constant outputs, without reading the data."""
    if value.is_initializer() or value.const_value is not None:
        return True
    return value.producer() is not None and value.producer().op_type == "Constant" and const_array(value) is not None


def weight_is_known(value: ir.Value) -> bool:
    """A constant, or a DequantizeLinear of constants (a quantized model's weight; lrpc.graph.weight_array)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.domain in ("", "ai.onnx"):
        return all(v is None or const_array_is_known(v) for v in producer.inputs)
    return const_array_is_known(value)


def find_attributions(graph: ir.Graph, names: list[str] | None = None) -> list[Attribution]:
    """Every float input and every integer input feeding an embedding lookup, or exactly `names`."""
    by_name = {v.name: v for v in graph.inputs}
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise LrpcError(f"--attribute names unknown input(s) {', '.join(unknown)}; the model's inputs are "
                            f"{', '.join(by_name)}")
        candidates = [by_name[n] for n in names]
    else:
        candidates = [v for v in graph.inputs if not v.is_initializer()]
    attributions = []
    for value in candidates:
        if is_float(value):
            attributions.append(Attribution(value, "float", [value]))
            continue
        points = embedding_lookups(graph, value)
        if points:
            attributions.append(Attribution(value, "token", points))
        elif names:
            raise LrpcError(f"input '{value.name}' is neither a float input nor token ids feeding an embedding "
                            "lookup, so it carries no relevance; drop it from --attribute")
    if not attributions:
        raise LrpcError("no input can be attributed: the model has no float input and no token ids feeding an "
                        "embedding table (a Gather from a float initializer); name one with --attribute")
    return attributions


def _maybe_float(value: ir.Value) -> bool:
    """Float, or of unknown type (a custom op's output): assume it carries, so a missing rule is reported."""
    return value.dtype is None or is_float(value)


def relevance_carrying(graph: ir.Graph, sources: set[ir.Value], cut: set[ir.Value] = frozenset()) -> set[ir.Value]:
    """Forward closure: float outputs of differentiable ops with a carrying input. `cut` values are constants."""
    carrying = set(sources)
    for node in graph:  # graph nodes are kept in topological order
        if ops.is_kind(node, ops.NON_DIFFERENTIABLE):  # zero derivative: never passes relevance on
            continue
        # a fused node's outputs carry what its decomposition's do (which may start at an attribution point, or
        # end at a tensor a preset cuts), whatever its own inputs carry
        aliases = node.meta.get(ops.ALIAS)
        if aliases:
            carrying.update(o for o, new in zip(node.outputs, aliases) if new in carrying and o not in cut)
            continue
        read = [i for i in ops.differentiable_inputs(node) + outer_captures(node) if i is not None and i in carrying]
        if read:
            quantized = any(not _maybe_float(i) for i in read)
            carrying.update(o for o in ops.carrying_outputs(node, _maybe_float, quantized) if o not in cut)
    return carrying

