"""ONNX ops defined by a function body (their schema's function, or context-dependent function, for the
model's opset): a node of such an op that has no row of its own in the registry is expanded into that body
(lrpc.ops.decomposition). The node keeps computing the forward, the body carries the relevance, like any
ONNX-domain fused op (an op of another ONNX domain, e.g. ai.onnx.preview's FlexAttention, which onnxruntime
does not run, is replaced by its body); the body's own ops get their rules, and what needs expanding in it (a Scan, another
function op) is expanded in turn (lrpc.decompose). onnx's inliner does the expansion itself: attribute
references, defaults, renaming inside subgraphs and the version conversion of a body written for an older
opset are its own."""

from __future__ import annotations

import functools

import onnx
import onnx.inliner
import onnx_ir as ir
from onnx import helper

DOMAIN = "lrp.function"   # the local function the node is made a call of, for the inliner


@functools.cache
def _schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _version(versions, opset: int) -> int | None:
    """The latest function version in force at `opset`."""
    return max((v for v in versions if v <= opset), default=None)


def _opset(node: ir.Node, opsets: dict[str, int]) -> int | None:
    """The version of the node's domain the model imports."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    return opsets.get(domain, opsets.get("ai.onnx")) if domain == "" else opsets.get(domain)


def _lookup(node: ir.Node, opsets: dict[str, int]) -> tuple[onnx.defs.OpSchema, int] | None:
    opset = _opset(node, opsets)
    schema = _schema(node.op_type, "" if node.domain == "ai.onnx" else node.domain, opset) if opset else None
    return (schema, opset) if schema is not None else None


def has_body(node: ir.Node, opsets: dict[str, int]) -> bool:
    found = _lookup(node, opsets)
    return found is not None and (_version(found[0].function_opset_versions, found[1]) is not None or
                                  _version(found[0].context_dependent_function_opset_versions, found[1]) is not None)


def _type(value: ir.Value) -> onnx.TypeProto:
    dims = None if value.shape is None else [d if isinstance(d, int) else d.value for d in value.shape]
    return helper.make_tensor_type_proto(value.dtype.value if value.dtype is not None else 0, dims)


def body(node: ir.Node, opsets: dict[str, int]) -> onnx.FunctionProto | None:
    """The node's function body at the model's opset (its plain function, else its context-dependent one,
    built for the node's attributes and input types), its tensors named by position: i0, … in, o0, … out."""
    found = _lookup(node, opsets)
    if found is None:
        return None
    schema, opset = found
    function = onnx.FunctionProto()
    if (version := _version(schema.function_opset_versions, opset)) is not None:
        function.ParseFromString(schema.get_function_with_opset_version(version))
    elif (version := _version(schema.context_dependent_function_opset_versions, opset)) is not None:
        types = [_type(v).SerializeToString() if v is not None else onnx.TypeProto().SerializeToString()
                 for v in node.inputs]
        function.ParseFromString(schema.get_context_dependent_function_with_opset_version(
            version, _call(node).SerializeToString(), types))
    else:
        return None
    return function


def _call(node: ir.Node) -> onnx.NodeProto:
    """The node as a NodeProto reading i0… and writing o0… (absent optional inputs stay '')."""
    proto = ir.serde.serialize_node(node)
    proto.ClearField("input")
    proto.ClearField("output")
    proto.input.extend("" if v is None else f"i{i}" for i, v in enumerate(node.inputs))
    proto.output.extend(f"o{i}" for i in range(len(node.outputs)))
    return proto


def expand(node: ir.Node, b, ctx) -> list[ir.Value | None] | None:
    """Decomposition handler: the node's body inserted before it; its outputs (None: no body at this opset)."""
    function = body(node, ctx.opsets)
    if function is None:
        return None
    schema, _ = _lookup(node, ctx.opsets)
    call = _call(node)
    given = {a.name for a in call.attribute}
    call.attribute.extend(a.default_value for name, a in schema.attributes.items()
                          if name not in given and a.default_value.name)   # defaults the body refers to
    call.domain, function.domain = DOMAIN, DOMAIN
    function.name = call.op_type
    present = [(f"i{i}", v) for i, v in enumerate(node.inputs) if v is not None]
    graph = helper.make_graph([call], "expand", [helper.make_value_info(name, _type(v)) for name, v in present],
                              [helper.make_value_info(f"o{i}", onnx.TypeProto()) for i in range(len(node.outputs))])
    imports = [helper.make_opsetid(domain, version) for domain, version in {**ctx.opsets, DOMAIN: 1}.items()]
    model = helper.make_model(graph, functions=[function], opset_imports=imports)
    inlined = ir.serde.deserialize_model(onnx.inliner.inline_local_functions(model, convert_version=True))
    inner = inlined.graph
    outer = dict(zip(inner.inputs, (v for _, v in present)))
    outputs = [outer.get(v, v) for v in inner.outputs]
    for value, replacement in outer.items():
        ir.convenience.replace_all_uses_with(value, replacement)
    inner.outputs.clear()
    for n in list(inner):
        inner.remove(n)
        n.name = b.fresh(n.op_type)
        for value in n.outputs:
            value.name = b.fresh("body")
        b.graph.insert_before(b.anchor, n)
    return outputs
