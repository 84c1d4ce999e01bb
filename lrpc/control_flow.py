"""Control flow (If, Loop, Scan) for the relevance. An If whose condition is static has its taken branch
inlined next to it: the If keeps computing the forward, the inlined copy carries the relevance (lrpc.ops,
the alias of a decomposition). Control flow whose subgraphs read a relevance-carrying tensor otherwise is
refused in one line (lrpc.analysis counts those captures, so it is never taken for a constant)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.graph import const_array, subgraphs


def inline_static_if(node: ir.Node, b, ctx) -> list[ir.Value] | None:
    """The taken branch's outputs, its nodes copied before the If (None: the condition is known only at run
    time, or the branch holds control flow of its own)."""
    condition = const_array(node.inputs[0])
    if condition is None:
        return None
    branch = node.attributes["then_branch" if bool(np.asarray(condition).reshape(-1)[0]) else "else_branch"].value
    if any(subgraphs(inner) for inner in branch):
        return None
    copies: dict[ir.Value, ir.Value] = {v: b.const(v.const_value.numpy(), hint="branch")
                                        for v in branch.initializers.values()}
    for inner in branch:
        outputs = [ir.Value(name=b.fresh("branch")) for _ in inner.outputs]
        b.graph.insert_before(b.anchor, ir.Node(inner.domain, inner.op_type, [copies.get(v, v) for v in inner.inputs],
                                                list(inner.attributes.values()), outputs=outputs,
                                                name=b.fresh(inner.op_type)))
        copies.update(zip(inner.outputs, outputs))
    return [copies.get(v, v) for v in branch.outputs]
