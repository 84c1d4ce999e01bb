"""In-graph chunking of the K axis (docs/design.md, "Many targets: the K axis").

A `--targets dynamic` explainer's relevance pass is every node computed from the seed inputs
(lrp_target / lrp_position / lrp_seed). This pass moves those nodes into the body of one ONNX `Loop` over
chunks of at most C targets: the forward runs once, outside, and the body reads its values from the outer
scope (no copies); each iteration gathers its chunk's columns of the (already checked) index inputs, runs
the reverse on them, and emits the chunk's relevance as scan outputs, which are joined back to the
contract's layout after the loop. The ĝ·Wᵀ products then multiply C·T rows at a time, which keep their
operand in cache where K·T rows do not.

The input checks (lrpc/graph.py `checked`) stay outside the loop, on all K columns: K = 0 is refused before
any chunk is computed. A K that is not a multiple of C runs n = ⌈K/C⌉ chunks of c = ⌈K/n⌉ targets, the last
chunk's missing columns filled with the last target (its relevance is sliced off after the loop): padding
rather than a ragged last chunk because a Loop's scan outputs must have one shape in every iteration, and
the balanced c wastes fewer than n columns (none when K ≤ C: one chunk of K).
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import contract
from lrpc.errors import LrpcError
from lrpc.graph import Builder, is_input_check, outer_captures

# Targets per iteration (compile's target_chunk default), measured on llama-bench at 256 tokens, K = 16:
# see README, "Performance".
CHUNK = 4
PREFIX = "lrp_kchunk_"
CHUNK_DIM = "lrp_target_chunk"   # the body's K: the chunk's size


def chunk_targets(graph: ir.Graph, chunk: int, fixed_k: int | None = None) -> None:
    """Move the relevance pass of `graph` (emitted for a dynamic K, before the untouched forward is
    attached) into a Loop over chunks of at most `chunk` targets; `fixed_k`: then fix K in the contract's
    inputs and outputs (an explainer compiled with --targets K)."""
    seeds = [v for v in graph.inputs if v.name in (contract.TARGET, contract.POSITION, contract.SEED)]
    nodes = list(graph)
    relevance = _computed_from(nodes, seeds)
    checks = _cone([n for n in nodes if n in relevance and is_input_check(n)], relevance)
    body_nodes = [n for n in nodes if n in relevance and n not in checks]
    # the index inputs and their checked copies, [batch, K, …]: the body reads its chunk's columns of them
    columns = set(seeds) | {n.outputs[0] for n in checks if is_input_check(n)}
    # what the checks compute that the body reads too (the index inputs' shape): made again in the body,
    # from the chunk's columns
    shared = _cone([v.producer() for n in body_nodes for v in n.inputs if v is not None and v not in columns
                    and v.producer() in checks], checks, stop=is_input_check)
    inside = {v for n in body_nodes for v in n.outputs}
    outputs = [(v, _k_axis(v)) for v in graph.outputs if v in inside]
    for value in inside:
        if not value.is_graph_output() and any(user not in body_nodes for user, _ in value.uses()):
            raise LrpcError(f"internal: '{value.name}' of the relevance pass is read by the forward; cannot chunk K")

    b = Builder(graph, prefix=PREFIX)
    # K read off a checked column: the loop starts after the checks (K = 0 is refused, not looped over)
    k = b.Shape(min(columns - set(seeds), key=lambda v: v.name, default=seeds[0]), start=1, end=2)
    count = b.Div(b.Add(k, b.i64([chunk - 1])), b.i64([chunk]))           # n = ⌈K/C⌉
    size = b.Div(b.Add(k, b.Sub(b.Max(count, b.i64([1])), b.i64([1]))), b.Max(count, b.i64([1])))  # c = ⌈K/n⌉
    last = b.Sub(k, b.i64([1]))

    body = ir.Graph([], [], nodes=[], name=PREFIX + "body", opset_imports=dict(graph.opset_imports))
    iteration = ir.Value(name=b.fresh("iteration"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond_in = ir.Value(name=b.fresh("cond_in"), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    body.inputs.extend([iteration, cond_in])
    inner = Builder(body, prefix=PREFIX)
    inner.taken, inner.const = b.taken, b.const    # one namespace; constants live in the outer graph
    width = inner.Squeeze(size, b.i64([0]))
    start = inner.Mul(iteration, width)
    index = inner.Min(inner.Range(start, inner.Add(start, width), b.i64(1)), inner.Squeeze(last, b.i64([0])))
    read = {v for n in [*shared, *body_nodes] for v in [*n.inputs, *outer_captures(n)] if v is not None}
    renamed = {value: inner.Gather(value, index, axis=1) for value in sorted(read & columns, key=lambda v: v.name)}
    for node in [n for n in nodes if n in shared]:
        copy = ir.Node(node.domain, node.op_type, [renamed.get(v, v) for v in node.inputs],
                       list(node.attributes.values()), outputs=[ir.Value(name=b.fresh(v.name)) for v in node.outputs],
                       name=b.fresh(node.name))
        body.append(copy)
        renamed.update(zip(node.outputs, copy.outputs))
    for node in body_nodes:
        graph.remove(node)
        body.append(node)
        for i, value in enumerate(node.inputs):
            if value in renamed:
                node.replace_input_with(i, renamed[value])
        for out in node.outputs:
            if out.shape is not None:
                out.shape = ir.Shape([CHUNK_DIM if getattr(d, "value", None) == contract.K_DIM else d
                                      for d in out.shape])
    cond_out = inner.Identity(cond_in)
    body.outputs.append(cond_out)
    scans = []
    for value, (axis, shape) in outputs:
        position = graph.outputs.index(value)
        final = ir.Value(name=value.name, type=value.type, shape=shape)
        value.name = b.fresh("chunk_" + value.name.replace(".", "_"))
        graph.outputs[position] = final   # made by _joined below
        body.outputs.append(value)
        scans.append((final, axis, position))
    scan_values = [ir.Value(name=b.fresh("scan")) for _ in scans]
    graph.append(ir.Node("", "Loop", [b.Squeeze(count, b.i64([0])), None], attributes=[ir.AttrGraph("body", body)],
                         outputs=scan_values, name=b.fresh("Loop")))
    for (final, axis, _), stacked in zip(scans, scan_values):
        _joined(b, stacked, axis, k, final)
    if fixed_k is not None:
        for value in [*seeds, *(final for final, _, _ in scans)]:
            value.shape = ir.Shape([fixed_k if getattr(d, "value", None) == contract.K_DIM else d for d in value.shape])


def _joined(b: Builder, stacked: ir.Value, axis: int, k: ir.Value, final: ir.Value) -> None:
    """[n, …, c (at axis), …] → […, K, …]: the chunks side by side along axis, the padding sliced off."""
    rank = final.shape.rank()
    perm = [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]
    moved = b.Transpose(stacked, perm=perm)
    shape = b.Concat(*([b.Shape(moved, end=axis)] if axis else []), b.i64([-1]),
                     *([b.Shape(moved, start=axis + 2)] if axis + 1 < rank else []), axis=0)
    merged = b.Reshape(moved, shape)
    b.graph.append(ir.Node("", "Slice", [merged, b.i64([0]), k, b.i64([axis])], outputs=[final],
                           name=b.fresh("Slice")))


def _k_axis(value: ir.Value) -> tuple[int, ir.Shape]:
    """The axis of a relevance output that is K (named lrp_targets in its declared shape), and that shape."""
    axes = [i for i, d in enumerate(value.shape or []) if getattr(d, "value", None) == contract.K_DIM]
    if len(axes) != 1:
        raise LrpcError(f"internal: output '{value.name}' has no single K axis; cannot chunk K")
    return axes[0], ir.Shape(list(value.shape))


def _computed_from(nodes: list[ir.Node], sources: list[ir.Value]) -> set[ir.Node]:
    """The nodes (in graph order) computed from `sources`, counting values their subgraphs read."""
    found, values = set(), set(sources)
    for node in nodes:
        if any(v in values for v in [*node.inputs, *outer_captures(node)] if v is not None):
            found.add(node)
            values.update(node.outputs)
    return found


def _cone(ends: list[ir.Node | None], within: set[ir.Node], stop=lambda node: False) -> set[ir.Node]:
    """`ends` and every node of `within` they read from, back to the nodes that `stop` (left out)."""
    cone, stack = set(), [n for n in ends if n is not None]
    while stack:
        node = stack.pop()
        if node in cone or node not in within or stop(node):
            continue
        cone.add(node)
        stack.extend(v.producer() for v in [*node.inputs, *outer_captures(node)]
                         if v is not None and v.producer() is not None)
    return cone
