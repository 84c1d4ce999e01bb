"""`--embeddings-input`: the explainer takes the embedding lookup's output as a model input.

For every attributed token-id input `<ids>` the Gather from the embedding table is cut out of the
graph and its output is replaced by a new float input `inputs_embeds.<ids>` (same shape and dtype
as the lookup's output, `[batch, seq, hidden]`). The ids input stays (its values still decide
shapes, positions or masks where the model uses them) but no longer feeds the table, so any
embedding — zeroed, scaled, interpolated — can be fed. Perturbation curves and path methods
(Integrated Gradients) work in this space.

The contract stays: relevance is still reported as `relevance.<ids>`, one value per token, the
sum over the hidden axis of `e ⊙ ĝ_e` at the new input, which equals the ids explainer's
relevance when `e` is the table row of each id.
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import ops
from lrpc.analysis import ID_PATH_OPS, Attribution, embedding_lookups
from lrpc.errors import LrpcError
from lrpc.graph import all_names, is_float

EMBEDS_PREFIX = "inputs_embeds."


def embeds_name(ids_name: str) -> str:
    return EMBEDS_PREFIX + ids_name


def expose(graph: ir.Graph, attribute: list[str] | None) -> tuple[dict[str, str], list[str] | None]:
    """Replace each attributed id input's embedding lookup by a new float input.

    Returns ({embeds input name: ids input name}, the attribute list to analyse with — the ids names
    swapped for the embeds names, or None when `attribute` was None).
    """
    by_name = {v.name: v for v in graph.inputs}
    candidates = [by_name[n] for n in attribute if n in by_name] if attribute else \
        [v for v in graph.inputs if not v.is_initializer()]
    taken = all_names(graph)
    exposed: dict[str, str] = {}
    for ids in candidates:
        if is_float(ids):
            continue
        lookups = embedding_lookups(graph, ids)
        if not lookups:
            continue
        if len(lookups) != 1:
            raise LrpcError(f"--embeddings-input: input '{ids.name}' feeds {len(lookups)} embedding lookups "
                            f"({', '.join(v.name for v in lookups)}); only one lookup per id input can be exposed")
        looked_up = lookups[0]
        name = embeds_name(ids.name)
        if name in taken:
            raise LrpcError(f"--embeddings-input: the model already has a tensor named '{name}'")
        taken.add(name)
        new = ir.Value(name=name, type=ir.TensorType(looked_up.dtype or ir.DataType.FLOAT),
                       shape=ir.Shape(list(looked_up.shape)) if looked_up.shape is not None else None)
        graph.inputs.append(new)
        was_output = looked_up.is_graph_output()
        looked_up.replace_all_uses_with(new)
        if was_output:
            for i, out in enumerate(graph.outputs):
                if out is looked_up:
                    graph.outputs[i] = new
        gather = looked_up.producer()
        if not looked_up.uses() and not looked_up.is_graph_output():
            graph.remove(gather, safe=True)
        _decompose_kept_readers(graph, ids)
        exposed[name] = ids.name
    if not exposed:
        raise LrpcError("--embeddings-input: no attributed input is token ids feeding an embedding table "
                        "(a Gather from a float initializer)")
    if attribute:
        back = {v: k for k, v in exposed.items()}
        attribute = [back.get(n, n) for n in attribute]
    return exposed, attribute


def _decompose_kept_readers(graph: ir.Graph, ids: ir.Value) -> None:
    """A fused node kept for the forward that reads the ids (QEmbedLayerNormalization: lrpc.decompose, ops.ALIAS)
    computes the embedding inside the op, so the new input would reach its decomposition alone: its outputs
    become its decomposition's, and the model's outputs follow the fed embedding."""
    path, frontier = {ids}, [ids]
    while frontier:   # the ids and the tensors carrying them unchanged (as embedding_lookups walks them)
        for node, index in frontier.pop().uses():
            if node.op_type in ID_PATH_OPS and index == 0 and node.domain in ("", "ai.onnx") \
                    and node.outputs[0] not in path:
                path.add(node.outputs[0])
                frontier.append(node.outputs[0])
    for node in [n for n in graph if ops.ALIAS in n.meta and any(v in path for v in n.inputs)]:
        for old, new in zip(node.outputs, node.meta[ops.ALIAS]):
            if new is not None:
                name, old.name = old.name, None
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                new.name = name
        graph.remove(node, safe=True)


def as_token_attributions(graph: ir.Graph, attributions: list[Attribution],
                          exposed: dict[str, str]) -> list[Attribution]:
    """The exposed float inputs report as their id inputs: kind 'token', point = the embeds input."""
    by_name = {v.name: v for v in graph.inputs}
    out = []
    for a in attributions:
        if a.input.name in exposed:
            out.append(Attribution(by_name[exposed[a.input.name]], "token", [a.input]))
        else:
            out.append(a)
    return out
