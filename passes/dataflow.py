"""Dataflow facts the passes share: walks through elementwise ops (lrpc.ops), and the DAG of relevance-carrying tensors
with its dominator and post-dominator trees (networkx)."""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir

from lrpc import ops
from lrpc.analysis import dequantized_once
from lrpc.plan import Rule

ROOT, SINK = "<sources>", "<outputs>"


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def elementwise(node: ir.Node | None) -> bool:
    """Acts elementwise on its float operands (lrpc.ops: kinds ELEMENTWISE and NONLINEAR)."""
    return ops.is_kind(node, ops.ELEMENTWISE, ops.NONLINEAR)


def carrying_inputs(node: ir.Node, carrying: set[ir.Value]) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v in carrying]


def stands_for(value: ir.Value) -> ir.Value | None:
    """The tensor of a fused node's decomposition that its output `value` stands for (relevance runs through
    it; lrpc.decompose, ops.ALIAS), else None."""
    producer = value.producer()
    aliases = producer.meta.get(ops.ALIAS) if producer is not None else None
    return aliases[producer.outputs.index(value)] if aliases else None


def walk_up_elementwise(start: ir.Value, carrying: set[ir.Value]):
    """Yield `start` and every carrying tensor above it reached through elementwise ops only (and from a fused
    node's output to its decomposition's), each once; the walk stops at (but yields) tensors made by any
    other op. Identical dequantizations of one tensor are yielded as one (lrpc.analysis.dequantized_once)."""
    seen, stack = set(), [start]
    while stack:
        value = dequantized_once(stack.pop())
        if value in seen:
            continue
        seen.add(value)
        yield value
        producer = value.producer()
        if (alias := stands_for(value)) is not None and alias in carrying:
            stack.append(alias)
        elif elementwise(producer):
            stack.extend(carrying_inputs(producer, carrying))


def elementwise_ancestry(start: ir.Value, carrying: set[ir.Value]) -> set[ir.Value]:
    """`start` and every carrying tensor reached from it upwards through elementwise ops only."""
    return set(walk_up_elementwise(start, carrying))


class CarryingDAG:
    """Tensors that carry relevance as a DAG (edges through the nodes that relate them), rooted at a
    virtual source before every attribution point and closed by a virtual sink after every output.
    Identical dequantizations of one tensor are one vertex (`vertex`; lrpc.analysis.dequantized_once)."""

    vertex = staticmethod(dequantized_once)   # the vertex of a carrying tensor

    def __init__(self, graph: ir.Graph, carrying: set[ir.Value]):
        dag = nx.DiGraph()
        dag.add_node(ROOT)
        dag.add_node(SINK)
        for node in graph:
            outs = [o for o in node.outputs if o in carrying]
            aliases = node.meta.get(ops.ALIAS)
            if aliases:   # a fused node's outputs are its decomposition's (lrpc.decompose)
                dag.add_edges_from((self.vertex(new), o) for o, new in zip(node.outputs, aliases)
                                   if o in outs and new in carrying)
                continue
            ins = [self.vertex(i) for i in carrying_inputs(node, carrying)]
            for o in outs:
                for i in ins:
                    dag.add_edge(i, self.vertex(o))
        for value in list(dag.nodes):
            if value in (ROOT, SINK):
                continue
            if dag.in_degree(value) == 0:
                dag.add_edge(ROOT, value)
            if dag.out_degree(value) == 0 or value.is_graph_output():
                dag.add_edge(value, SINK)
        self.dag = dag
        self.order = {v: i for i, v in enumerate(nx.topological_sort(dag))}
        self.idom = nx.immediate_dominators(dag, ROOT)
        self.ipdom = nx.immediate_dominators(dag.reverse(copy=False), SINK)

    def between(self, top: ir.Value, bottom: ir.Value) -> set[ir.Node]:
        """Producers of the tensors on paths top → bottom (excluding top's own producer)."""
        below_top = nx.descendants(self.dag, top)
        above_bottom = nx.ancestors(self.dag, bottom)
        values = (below_top & above_bottom) | {bottom}
        return {v.producer() for v in values if isinstance(v, ir.Value) and v.producer() is not None}


def live_values(graph: ir.Graph, carrying: set[ir.Value], plan) -> set[ir.Value]:
    """Carrying tensors that relevance actually reaches from the graph outputs under the plan so far:
    a frozen statistic, the blocked side of a gating product and a CP-LRP softmax receive none."""
    live = {v for v in graph.outputs if v in carrying}
    by_name = {v.name: v for v in carrying}
    for node in reversed(list(graph)):
        if not any(o in live for o in node.outputs):
            continue
        aliases = node.meta.get(ops.ALIAS)
        if aliases:   # a fused node: relevance runs through its decomposition (lrpc.decompose)
            live.update(new for old, new in zip(node.outputs, aliases) if old in live and new is not None)
            continue
        record = plan.get(node)
        if record is not None and record.rule == Rule.NONE:
            continue
        blocked = {record.params["frozen"]} if record is not None and "frozen" in record.params else set()
        live.update(v for i, v in enumerate(node.inputs) if v is not None and v in carrying and i not in blocked)
        if record is not None and "input" in record.params:  # an identity region sends to its input directly
            live.add(by_name[record.params["input"]])
    return live


RESHAPES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")  # ops that move values without mixing them


def single_path_source(value: ir.Value, carrying: set[ir.Value]) -> list[ir.Value]:
    """`value` and the tensors above it along ops with one carrying input (casts, reshapes, scalings)."""
    chain = [value]
    while True:
        producer = value.producer()
        if (alias := stands_for(value)) is not None and alias in carrying:
            value = alias
        elif producer is not None and len(carrying_inputs(producer, carrying)) == 1 and \
                (elementwise(producer) or producer.op_type in RESHAPES):
            value = carrying_inputs(producer, carrying)[0]
        else:
            return chain
        chain.append(value)
