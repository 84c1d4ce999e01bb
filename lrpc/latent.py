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
    embedding output, or the float input) and the output of every residual Add (`lrpc.components.residual_adds`). `model`:
    any model source, or an ir.Model as `lrpc.compiler.load` returns it, which is only read (no rule pass
    runs on it, so the same loaded model is compiled next)."""
    from lrpc.analysis import find_attributions
    from lrpc.compiler import load
    from lrpc.components import residual_adds
    ir_model = model if isinstance(model, ir.Model) else load(model)
    points = [p for a in find_attributions(ir_model.graph) for p in a.points if a.kind == "token"]
    found = [(p.name, "embeddings") for p in points] + [(v.name, _scope(v.producer()))
                                                        for v in residual_adds(ir_model)]
    counts: dict[str, int] = {}
    for _, scope in found:
        counts[scope] = counts.get(scope, 0) + 1
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
