"""Model components found from the dataflow the passes analyse, their relevance outputs and intervention
inputs (docs/design.md, "Components and interventions").

A selector names a kind of component; each one resolves, layer by layer in graph order, to one tensor and
the axis that holds its units:

- `mlp`: the hidden units of each MLP — the output of a gated product (gate ⊙ up, a uniform-rule Mul one of
  whose operands comes from an activation region), else the output of an activation region;
- `heads`: each attention head's output before the output projection — the attention-weights × V product
  (a uniform-rule MatMul one of whose operands comes from a Softmax), [batch, heads, positions, head_dim];
  one unit per head;
- `residual`: the residual stream after each residual Add (`residual_adds`).

The plan that finds them is the attnlrp one whatever preset is compiled, so every preset sees the same
components. Only tensors of the form [batch, …, units] with a static unit count and a position axis are
components: a pooler's [batch, hidden] activation is not an MLP layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.graph import Builder

SELECTORS = ("mlp", "heads", "residual")
SCALE_PREFIX = "lrp_scale."
MASK_PREFIX = "lrp_mask."
BYPASS_PREFIX = "lrp_bypass."


@dataclass
class Component:
    kind: str                 # a selector
    layer: int                # index among the components of its kind, in graph order
    value: ir.Value           # the tensor whose units these are
    unit_axis: int            # the axis of `value` that holds the units
    position_axis: int        # the axis of `value` that holds the positions (tokens, patches)
    units: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    def describe(self) -> dict:
        return {"component": self.name, "tensor": self.value.name, "units": self.units,
                "shape": str(self.value.shape), "unit_axis": self.unit_axis}


def parse(selectors: str | list[str] | None) -> list[str]:
    """'mlp,heads' (or a list) → the selectors, each once, in SELECTORS order; an unknown one is an error."""
    if not selectors:
        return []
    names = selectors.split(",") if isinstance(selectors, str) else list(selectors)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in SELECTORS]
    if unknown:
        raise LrpcError(f"unknown component selector {', '.join(map(repr, unknown))}: use "
                        f"{', '.join(SELECTORS)} (comma-separated)")
    return [s for s in SELECTORS if s in names]


def resolve(ir_model: ir.Model, selectors: list[str]) -> list[Component]:
    """The components of the selected kinds, in SELECTORS order then graph order. The model is only read."""
    from lrpc.analysis import find_attributions
    from lrpc.plan import Rule
    from lrpc.presets import assign_rules
    from lrpc.passes.dataflow import single_path_source

    graph = ir_model.graph
    points = {p for a in find_attributions(graph) for p in a.points}
    plan, carrying = assign_rules(graph, points, "attnlrp")
    order = {node: i for i, node in enumerate(graph)}
    regions = {n.outputs[0] for n, r in plan.records.items() if r.rule == Rule.IDENTITY}
    softmaxes = {n.outputs[0] for n in graph if n.op_type == "Softmax" and n.inputs[0] in carrying}
    products = sorted((n for n, r in plan.records.items() if r.rule == Rule.UNIFORM), key=order.get)

    def fed_by(node, sources) -> bool:
        return any(v in sources for i in node.inputs for v in single_path_source(i, carrying))

    found: dict[str, list[tuple[ir.Value, int, int]]] = {s: [] for s in SELECTORS}
    gated = [n for n in products if n.op_type == "Mul" and fed_by(n, regions)]
    gating_regions = {v for n in gated for i in n.inputs for v in single_path_source(i, carrying) if v in regions}
    mlp = [n.outputs[0] for n in gated] + [v for v in regions if v not in gating_regions]
    found["mlp"] = [(v, -1, 1) for v in sorted(mlp, key=lambda v: order[v.producer()])]
    found["heads"] = [(n.outputs[0], 1, 2) for n in products if n.op_type == "MatMul" and fed_by(n, softmaxes)]
    found["residual"] = [(v, -1, 1) for v in residual_adds(ir_model)]
    components = []
    for kind in selectors:
        for value, unit_axis, position_axis in found[kind]:
            component = _component(kind, len([c for c in components if c.kind == kind]), value, unit_axis,
                                   position_axis)
            if component is not None:
                components.append(component)
        if not any(c.kind == kind for c in components):
            raise LrpcError(f"the model has no '{kind}' component lrpc can find (`lrpc plan --components "
                            f"{kind}` shows what each selector resolves to); drop it from --components")
    return components


def residual_adds(ir_model: ir.Model) -> list[ir.Value]:
    """The outputs of every Add whose two operands carry relevance and have the same shape [batch, seq,
    hidden] (the residual connections), in graph order; the model is only read."""
    from lrpc.analysis import find_attributions, relevance_carrying
    attributions = find_attributions(ir_model.graph)
    carrying = relevance_carrying(ir_model.graph, {p for a in attributions for p in a.points})
    points = [p for a in attributions for p in a.points if a.kind == "token"]
    hidden = {p.shape[-1] for p in points if p.shape is not None and p.shape.rank() == 3}
    found = []
    for node in ir_model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2 or not all(i in carrying for i in node.inputs):
            continue
        out = node.outputs[0]
        shapes = [v.shape for v in (*node.inputs, out)]
        if any(s is None or s.rank() != 3 for s in shapes) or len({str(s) for s in shapes}) != 1:
            continue
        if hidden and out.shape[-1] not in hidden:
            continue
        found.append(out)
    return found


def _component(kind, layer, value, unit_axis, position_axis) -> Component | None:
    shape = value.shape
    if shape is None or shape.rank() < 3 or (kind == "heads" and shape.rank() != 4):
        return None
    unit_axis %= shape.rank()
    units = shape[unit_axis]
    if not isinstance(units, int):
        return None
    return Component(kind, layer, value, unit_axis, position_axis, units)


def expose(ir_model: ir.Model, selectors) -> dict[str, str]:
    """Make each selected component's tensor a model output too (its units' activations come back with the
    model's outputs); returns component name → output name."""
    found = resolve(ir_model, parse(selectors))
    for c in found:
        if not c.value.is_graph_output():
            ir_model.graph.outputs.append(c.value)
    return {c.name: c.value.name for c in found}


# ---- interventions ------------------------------------------------------------------------------------

def intervene(graph: ir.Graph, components: list[Component]) -> list[str]:
    """Multiply each component's units by a new optional input `lrp_scale.<component>` (float32 [units],
    default all ones from an initializer of the same name) in the forward, rewiring every consumer. The
    component's tensor becomes the scaled one, so its relevance is that of the scaled model. x · 1.0 is x
    bit for bit, so with every factor 1 the explainer computes exactly what it computes without them."""
    b = Builder(graph)
    names = []
    for c in components:
        if c.value.is_graph_output():
            raise LrpcError(f"cannot intervene on '{c.value.name}': it is a model output")
        scale = _optional_input(graph, b, SCALE_PREFIX + c.name, [c.units])
        factor = _along_units(b, scale, c)
        if c.value.dtype != ir.DataType.FLOAT:
            factor = b.CastLike(factor, c.value)
        scaled = ir.Value(name=b.fresh(f"scaled_{c.kind}_{c.layer}"), shape=c.value.shape,
                          type=c.value.type)
        uses = list(c.value.uses())
        # a forward node: not named lrp_…, which marks the relevance pass's own nodes (lrpc.checkpoint, lrpc.optimise)
        node_name = f"intervene.{c.name}"
        if node_name in b.taken:
            raise LrpcError(f"the model already has a node named '{node_name}'; is it already an explainer? "
                            "compile the original model instead")
        b.taken.add(node_name)
        graph.append(ir.Node("", "Mul", [c.value, factor], outputs=[scaled], name=node_name))
        for node, index in uses:
            node.replace_input_with(index, scaled)
        c.value = scaled
        names.append(scale.name)
    graph.sort()
    return names


def condition(graph: ir.Graph, emitter, components: list[Component]) -> list[str]:
    """Conditional relevance (CRP; docs/design.md, "Conditional heatmaps"): per component, an optional input
    `lrp_mask.<component>` (float32 [units], default ones) that multiplies ĝ of its tensor along the units
    (a head's whole [head_dim] slice together), and `lrp_bypass.<component>` (float32 scalar, default 1)
    that multiplies the relevance reaching the inputs without passing through the tensor. Both at 1 change
    nothing bit for bit; a one-hot mask with bypass 0 is CRP's R(x | unit). Call before the walk."""
    names = []
    for c in components:
        mask = _optional_input(graph, emitter.b, MASK_PREFIX + c.name, [c.units])
        bypass = _optional_input(graph, emitter.b, BYPASS_PREFIX + c.name, [])
        emitter.condition(c.value, _along_units(emitter.b, mask, c), bypass)
        names += [mask.name, bypass.name]
    return names


def _optional_input(graph: ir.Graph, b: Builder, name: str, shape: list[int]) -> ir.Value:
    """A float32 graph input of ones backed by an initializer of the same name: optional and overridable
    at run time (onnxruntime's overridable initializers)."""
    if name in b.taken:
        raise LrpcError(f"the model already has a tensor named '{name}'; is it already an explainer? "
                        "compile the original model instead")
    b.taken.add(name)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape),
                     const_value=ir.tensor(np.ones(shape, np.float32), name=name))
    graph.register_initializer(value)
    graph.inputs.append(value)
    return value


def _along_units(b: Builder, factor: ir.Value, c: Component) -> ir.Value:
    """[units] → [units, 1, …] so it broadcasts along the component's unit axis (and any leading K axis)."""
    trailing = c.value.shape.rank() - 1 - c.unit_axis
    return b.Reshape(factor, b.i64([c.units] + [1] * trailing)) if trailing else factor


# ---- relevance outputs --------------------------------------------------------------------------------

def relevance_output(b: Builder, relevance: ir.Value, c: Component, k_axis: bool, per_position: bool) -> ir.Value:
    """x ⊙ ĝ of the component's tensor ([batch, (K,) *shape]) → one value per unit, [batch, (K,) units],
    summed over positions and every other axis; with `per_position`, [batch, (K,) positions, units]."""
    lead = 1 if k_axis else 0
    rank = c.value.shape.rank()
    keep = {c.unit_axis} | ({c.position_axis} if per_position else set())
    summed = [a + lead for a in range(1, rank) if a not in keep]
    r = b.ReduceSum(relevance, b.i64(summed), keepdims=0) if summed else relevance
    if per_position and c.position_axis > c.unit_axis:   # positions before units
        perm = list(range(lead + 1)) + [lead + 2, lead + 1]
        r = b.Transpose(r, perm=perm)
    return r


def output_shape(c: Component, targets_dim, per_position: bool) -> list:
    batch = c.value.shape[0]
    dims = [batch] + ([targets_dim] if targets_dim is not None else [])
    if per_position:
        dims.append(c.value.shape[c.position_axis])
    return dims + [c.units]

