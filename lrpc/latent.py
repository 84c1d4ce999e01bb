"""Graph queries for users: the tensors `--latent` can name, and each layer's residual stream (`--layers`)."""

from __future__ import annotations

import ast

import onnx_ir as ir


def carrying_tensors(model) -> list[tuple[str, str, str]]:
    """(tensor name, op type that makes it, shape) of every relevance-carrying tensor: names for --latent."""
    from lrpc.compiler import analyse_and_plan, load
    ir_model = load(model)
    _, carrying, _ = analyse_and_plan(ir_model, "attnlrp")
    return [(v.name, node.op_type, str(v.shape)) for node in ir_model.graph for v in node.outputs
            if v in carrying and v.name]


def residual_stream(model) -> list[tuple[str, str]]:
    """(tensor name, label) of each layer's residual stream, in graph order: the attribution point (the
    embedding output, or the float input) and the output of every Add whose two operands carry relevance
    and have the same shape [batch, seq, hidden] (the residual connections). `model`: any model source,
    or an ir.Model as `lrpc.compiler.load` returns it, which is only read (no rule pass runs on it, so the
    same loaded model is compiled next)."""
    from lrpc.analysis import find_attributions, relevance_carrying
    from lrpc.compiler import load
    ir_model = model if isinstance(model, ir.Model) else load(model)
    attributions = find_attributions(ir_model.graph)
    carrying = relevance_carrying(ir_model.graph, {p for a in attributions for p in a.points})
    points = [p for a in attributions for p in a.points if a.kind == "token"]
    hidden = {p.shape[-1] for p in points if p.shape is not None and p.shape.rank() == 3}
    found = [(p.name, "embeddings") for p in points]
    counts: dict[str, int] = {}
    for node in ir_model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or not all(i in carrying for i in node.inputs):
            continue
        out = node.outputs[0]
        shapes = [v.shape for v in (*node.inputs, out)]
        if any(s is None or s.rank() != 3 for s in shapes) or len({str(s) for s in shapes}) != 1:
            continue
        if hidden and out.shape[-1] not in hidden:
            continue
        scope = _scope(node)
        counts[scope] = counts.get(scope, 0) + 1
        found.append((out.name, scope))
    seen: dict[str, int] = {}
    labels = []
    for name, scope in found:   # a layer's residual adds: "layers.0 +1" (after attention), "layers.0 +2"
        seen[scope] = seen.get(scope, 0) + 1
        labels.append((name, f"{scope} +{seen[scope]}" if counts.get(scope, 1) > 1 else scope))
    return labels


def _scope(node) -> str:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    try:
        scopes = [s for s in (ast.literal_eval(raw) if raw else []) if s]
    except (ValueError, SyntaxError):
        scopes = []
    modules = scopes[:-1] if len(scopes) > 1 else scopes
    if not modules:
        return node.outputs[0].name
    label = modules[-1]
    for prefix in ("hf_model.model.", "hf_model.", "model.", "vit.", "transformer."):
        if label.startswith(prefix):
            label = label[len(prefix):]
    return label
