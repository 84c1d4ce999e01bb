"""Control flow (If, Loop, Scan) for the relevance. An If whose condition is static has its taken branch
inlined next to it, a Scan of static length its body unrolled: the node keeps computing the forward, the
inlined copy carries the relevance (lrpc.ops, the alias of a decomposition). Control flow whose subgraphs read a relevance-carrying tensor otherwise is
refused in one line (lrpc.analysis counts those captures, so it is never taken for a constant)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.graph import attr, const_array, subgraphs


def inline_static_if(node: ir.Node, b, ctx) -> list[ir.Value] | None:
    """The taken branch's outputs, its nodes copied before the If (None: the condition is known only at run
    time, or the branch holds control flow of its own)."""
    condition = const_array(node.inputs[0])
    if condition is None:
        return None
    branch = node.attributes["then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"].value
    if any(subgraphs(inner) for inner in branch):
        return None
    return _copy_body(b, branch, {})


def unroll_scan(node: ir.Node, b, ctx) -> list[ir.Value] | None:
    """A Scan over a length known at compile time: its body copied once per step before the Scan, the scan
    inputs sliced (Gather) and the scan outputs stacked (Unsqueeze, Concat) along their axes and directions.
    None: the length is known only at run time, or the body holds control flow of its own."""
    body = node.attributes["body"].value
    if any(subgraphs(inner) for inner in body):
        return None
    scans = int(node.attributes["num_scan_inputs"].value)
    states, inputs = list(node.inputs[:len(node.inputs) - scans]), list(node.inputs[len(node.inputs) - scans:])
    outputs = len(body.outputs) - len(states)
    in_axes, in_reverse = (list(attr(node, name) or [0] * scans)
                           for name in ("scan_input_axes", "scan_input_directions"))
    out_axes, out_reverse = (list(attr(node, name) or [0] * outputs)
                             for name in ("scan_output_axes", "scan_output_directions"))
    lengths = {b.dim(x, axis) for x, axis in zip(inputs, in_axes)}
    length = lengths.pop() if len(lengths) == 1 else None
    if not isinstance(length, int):
        return None
    stacked: list[list[ir.Value]] = [[] for _ in range(outputs)]
    for t in range(length):
        slices = [b.Gather(x, b.i64(length - 1 - t if back else t), axis=axis)
                  for x, axis, back in zip(inputs, in_axes, in_reverse)]
        results = _copy_body(b, body, dict(zip(body.inputs, states + slices)))
        states = results[:len(states)]
        for steps, y in zip(stacked, results[len(states):]):
            steps.append(y)
    return states + [b.Concat(*[b.Unsqueeze(y, b.i64([axis])) for y in (steps[::-1] if back else steps)], axis=axis)
                     for steps, axis, back in zip(stacked, out_axes, out_reverse)]


def _copy_body(b, graph: ir.Graph, copies: dict[ir.Value, ir.Value]) -> list[ir.Value]:
    """graph's outputs, its nodes copied before the node being decomposed, reading `copies` for its inputs
    (and the outer graph's tensors for what it captures)."""
    copies = {**copies, **{v: b.const(v.const_value.numpy(), hint="branch") for v in graph.initializers.values()}}
    for inner in graph:
        outputs = [ir.Value(name=b.fresh("branch")) for _ in inner.outputs]
        b.graph.insert_before(b.anchor, ir.Node(inner.domain, inner.op_type, [copies.get(v, v) for v in inner.inputs],
                                                list(inner.attributes.values()), outputs=outputs,
                                                name=b.fresh(inner.op_type)))
        copies.update(zip(inner.outputs, outputs))
    return [copies.get(v, v) for v in graph.outputs]
