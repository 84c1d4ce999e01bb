"""Rematerialisation (`lrpc compile --checkpoint auto|N`): trade one extra forward for √L memory.

Without it, every forward activation a relevance rule reads stays alive from the forward pass until
the reverse walk reaches it: peak memory grows linearly with depth. With it, only the residual stream
at every N-th layer boundary (N = round(√L) for `auto`) is kept; the forward nodes of each segment
are cloned, the relevance rules of that segment read the clones, and the clones are made to run
just before the segment's relevance is needed by an explicit data dependency on ĝ at the segment's
upper boundary: the clone of the boundary is `Reshape(b, Max(Shape(b), Min(Shape(ĝ), Shape(b))))`,
which equals `b` (a view, no copy) but cannot be computed before ĝ exists, whatever order
onnxruntime picks. The originals are then only read by forward nodes and freed as the forward goes.

Layers are found from dataflow, not names: the boundaries are the tensors every path from the
attributed inputs to the explained output passes through (its dominators in the DAG of
relevance-carrying tensors), and a layer starts at the last such tensor before each Softmax.
"""

from __future__ import annotations

import math

import networkx as nx
import onnx_ir as ir

from lrpc.errors import LrpcError
from lrpc.graph import PREFIX, Builder

ROOT = "<root>"


def _is_reverse(node: ir.Node) -> bool:
    return (node.name or "").startswith(PREFIX)


def layer_boundaries(graph: ir.Graph, carrying: set[ir.Value], y: ir.Value) -> list[ir.Value]:
    """Residual-stream tensors at the start of each layer, in graph order."""
    forward = [n for n in graph if not _is_reverse(n)]
    pos = {n: i for i, n in enumerate(forward)}
    dag = nx.DiGraph()
    for node in forward:
        ins = [v for v in node.inputs if v is not None and v in carrying]
        for o in node.outputs:
            if o in carrying:
                for i in ins:
                    dag.add_edge(i, o)
    if y not in dag:
        return []
    keep = nx.ancestors(dag, y) | {y}
    dag = dag.subgraph(keep).copy()
    for v in list(dag.nodes):
        if dag.in_degree(v) == 0:
            dag.add_edge(ROOT, v)
    idom = nx.immediate_dominators(dag, ROOT)
    chain, v = [], y
    while v != ROOT:
        chain.append(v)
        v = idom[v]
    chain.reverse()

    def where(value):
        p = value.producer()
        return pos.get(p, -1) if p is not None else -1
    softmaxes = [n for n in forward if n.op_type == "Softmax" and n.outputs[0] in keep]
    if not softmaxes:
        return chain[:-1]
    starts = []
    for s in softmaxes:
        before = [c for c in chain if where(c) < pos[s]]
        if before and (not starts or starts[-1] is not before[-1]):
            starts.append(before[-1])
    return starts


def rematerialise(graph: ir.Graph, carrying: set[ir.Value], y: ir.Value, grad_of: dict, b: Builder,
                  every: int | str) -> dict:
    """Clone each segment's forward nodes for its relevance rules; returns a summary."""
    starts = layer_boundaries(graph, carrying, y)
    layers = len(starts)
    if every == "auto":
        every = max(1, round(math.sqrt(layers)))
    try:
        every = int(every)
    except ValueError:
        raise LrpcError(f"--checkpoint {every!r}: use auto or a positive number of layers per segment") from None
    if every < 1:
        raise LrpcError(f"--checkpoint {every}: use auto or a positive number of layers per segment")
    bounds = starts[::every]
    if len(bounds) < 2:
        return {"layers": layers, "every": every, "segments": 0}
    consumers: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        for v in node.inputs:
            if v is not None:
                consumers.setdefault(v, []).append(node)

    def descendants(value):
        seen, stack = set(), [value]
        while stack:
            for node in consumers.get(stack.pop(), []):
                if node not in seen and not _is_reverse(node):
                    seen.add(node)
                    stack.extend(node.outputs)
        return seen
    below = [descendants(v) for v in bounds]
    order = {n: i for i, n in enumerate(graph)}
    segments = 0
    for i in range(len(bounds) - 1):
        start, nxt = bounds[i], bounds[i + 1]
        grad = grad_of.get(nxt)
        if grad is None:  # ĝ has the boundary's shape (or its one-row form): same rank
            continue
        members = below[i] - below[i + 1]
        # A clone runs after ĝ at `nxt`, so no node ĝ at `nxt` depends on may read one: a segment's members
        # also include forward values later layers' rules read (GPT-2's and ViT's Shape of the first
        # residual, reused for every layer's reshapes); those keep reading the original (else a cycle).
        feeds_grad = _producers_upstream(grad)

        def rematerialised(node):
            return _is_reverse(node) and node not in feeds_grad and not node.name.startswith(PREFIX + "remat_")
        needed = {v for n in members for v in n.outputs if any(map(rematerialised, consumers.get(v, [])))}
        if not needed:
            continue
        closure, stack = set(), [v.producer() for v in needed]
        while stack:
            node = stack.pop()
            if node is None or node in closure or node not in members:
                continue
            closure.add(node)
            stack.extend(v.producer() for v in node.inputs if v is not None)
        shape = b.Shape(start)
        mapping = {start: b.Reshape(start, b.Max(shape, b.Min(b.Shape(grad, _keep=True), shape)))}
        for node in sorted(closure, key=order.get):
            inputs = [mapping.get(v, v) if v is not None else None for v in node.inputs]
            outs = [ir.Value(name=b.fresh("remat"), shape=o.shape, type=o.type) for o in node.outputs]
            clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), outputs=outs,
                            name=b.fresh("remat_" + node.op_type), overload=node.overload, version=node.version)
            graph.append(clone)
            mapping.update(zip(node.outputs, outs))
        for v in needed:
            for c in consumers.get(v, []):
                if rematerialised(c):
                    for j, inp in enumerate(c.inputs):
                        if inp is v:
                            c.replace_input_with(j, mapping[v])
        segments += 1
    graph.sort()
    return {"layers": layers, "every": every, "segments": segments}


def _producers_upstream(value: ir.Value) -> set[ir.Node]:
    """Every node `value` depends on."""
    seen, stack = set(), [value.producer()]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen
