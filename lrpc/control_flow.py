"""Control flow (If, Loop, Scan) for the relevance. An If whose condition is static has its taken branch
inlined next to it, a Scan of static length its body unrolled, a Loop whose iteration count is known at
compile time too: the node keeps computing the forward, the inlined copy carries the relevance (lrpc.ops,
the alias of a decomposition). Control flow whose subgraphs read a relevance-carrying tensor otherwise is
refused in one line (lrpc.analysis counts those captures, so it is never taken for a constant)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc.graph import attr, checked, const_array, static_value, subgraphs


def inline_static_if(node: ir.Node, b, ctx) -> list[ir.Value] | None:
    """The taken branch's outputs, its nodes copied before the If (None: the condition is known only at run
    time, or the branch holds control flow of its own)."""
    condition = static_value(node.inputs[0])   # a constant, or computed from static dims
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


def unroll_loop(node: ir.Node, b, ctx) -> list[ir.Value] | None:
    """A Loop that runs N times, N known at compile time: its trip count when constant, else the static length
    of its scan outputs. The body is copied N times before the Loop (iteration number, condition and
    loop-carried values threaded through), the scan outputs stacked along axis 0. Unless the trip count is
    constant and every condition constant true, the copy checks at run time that the Loop ran exactly N
    iterations (from the trip count and the conditions the copy computes; a run that did not fails, naming
    the check), so its relevance is never that of another iteration count. None: N unknown, or nested
    control flow."""
    body = node.attributes["body"].value
    if any(subgraphs(inner) for inner in body):
        return None
    trip, condition, states = node.inputs[0], node.inputs[1], list(node.inputs[2:])
    trips = const_array(trip)
    count = int(trips) if trips is not None else None
    scans = node.outputs[len(states):]
    if count is None:
        lengths = {b.dim(y, 0) for y in scans}
        count = lengths.pop() if len(lengths) == 1 else None
    if not isinstance(count, int) or count <= 0:
        return None
    checks = [] if condition is None or _true(condition) else [condition]   # iteration 1 runs
    go_on = condition if condition is not None else b.const(np.array(True))
    stacked: list[list[ir.Value]] = [[] for _ in scans]
    for t in range(count):
        if t > 0 and not _true(go_on):
            checks.append(go_on)   # iteration t + 1 runs
        results = _copy_body(b, body, dict(zip(body.inputs, [b.i64(t), go_on] + states)))
        go_on, states = results[0], results[1:1 + len(states)]
        for steps, y in zip(stacked, results[1 + len(states):]):
            steps.append(b.Unsqueeze(y, b.i64([0])))
    if trips is None:   # and no iteration N + 1
        stop = None if _true(go_on) else b.Not(go_on)
        if trip is not None:
            checks.append(b.GreaterOrEqual(trip, b.i64(count)))
            stop = b.Equal(trip, b.i64(count)) if stop is None else b.Or(b.Equal(trip, b.i64(count)), stop)
        if stop is None:
            return None
        checks.append(stop)
    outputs = states + [b.Concat(*steps, axis=0) for steps in stacked]
    if not checks:
        return outputs
    ok = checks[0]
    for more in checks[1:]:
        ok = b.And(ok, more)
    # ĝ of each float output is read through × 1 from the check, so the relevance cannot skip it
    one = b.Reshape(checked(b, b.f32([1.0]), ok, "loop_iterations"), b.i64([]))
    return [b.Mul(y, b.CastLike(one, y)) if old.dtype is not None and old.dtype.is_floating_point() else y
            for y, old in zip(outputs, node.outputs)]


def _true(value: ir.Value) -> bool:
    known = const_array(value)
    return known is not None and bool(np.asarray(known).reshape(-1)[0])


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
