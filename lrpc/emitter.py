"""The relevance emitter: one reverse walk over the forward graph, one local rule per node.

Like reverse-mode autodiff: the modified gradient ĝ of every relevance-carrying tensor is the sum
of what its consumers' local rules send back; a node's rule is the plan's record for it (an AttnLRP
rule) or else its op's exact VJP from `rules.VJP`. Nothing is emitted for tensors that carry no
relevance, so no weight gradient is ever computed. All ĝ are float32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from lrpc import rules
from lrpc.errors import LrpcError
from lrpc.graph import Builder, attr, const_array, rank, same_dim
from lrpc.plan import Plan

F32 = ir.DataType.FLOAT


class Local:
    """What a local rule sees of one node: forward values (as float32), attributes, the builder."""

    def __init__(self, emitter: "Emitter", node: ir.Node, grads: list[ir.Value | None]):
        self.em, self.node, self.b, self.grads = emitter, node, emitter.b, grads
        self.inputs = node.inputs
        self._cache: dict[str, object] = {}

    def raw(self, i: int) -> ir.Value:
        return self.node.inputs[i]

    def raw_out(self, i: int = 0) -> ir.Value:
        return self.node.outputs[i]

    def x(self, i: int) -> ir.Value:
        return self.em.as_f32(self.node.inputs[i])

    def y(self, i: int = 0) -> ir.Value:
        return self.em.as_f32(self.node.outputs[i])

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def rank(self, i: int) -> int | None:
        return rank(self.node.inputs[i])

    def const(self, i: int):
        return const_array(self.node.inputs[i])

    def value(self, name: str) -> ir.Value:
        return self.em.values[name]

    def cached(self, key: str, make: Callable):
        def get():
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]
        return get

    def unbroadcast(self, grad: ir.Value, i: int) -> ir.Value:
        return self.em.unbroadcast(grad, self.node.inputs[i], self.node.outputs[0])

    def unbroadcast_to(self, grad: ir.Value, target: ir.Value, source: ir.Value) -> ir.Value:
        return self.em.unbroadcast(grad, target, source)

    def zeros_like(self, shape: ir.Value) -> ir.Value:
        return self.b.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=F32))

    def zeros_like_out(self, i: int) -> ir.Value:
        return self.zeros_like(self.b.Shape(self.node.outputs[i]))


class Emitter:
    def __init__(self, graph: ir.Graph, plan: Plan, carrying: set[ir.Value], builder: Builder):
        self.graph, self.plan, self.carrying, self.b = graph, plan, carrying, builder
        self.values = {v.name: v for v in carrying}
        self.nodes = {n.name: n for n in graph}
        self._f32: dict[ir.Value, ir.Value] = {}

    def as_f32(self, value: ir.Value) -> ir.Value:
        """Forward values enter the rules in float32 (relevance is float32 even for fp16/bf16 models)."""
        if value.dtype == F32:
            return value
        if value not in self._f32:
            self._f32[value] = self.b.Cast(value, to=F32)
        return self._f32[value]

    def unbroadcast(self, grad: ir.Value, target: ir.Value, source: ir.Value) -> ir.Value:
        """Sum ĝ (shaped like `source`) over the axes that broadcasting added to `target`."""
        b = self.b
        rt, rs = rank(target), rank(source)
        if rt is None or rs is None:
            lead = b.Sub(b.Size(b.Shape(grad)), b.Size(b.Shape(target)))
            grad = b.ReduceSum(grad, b.Range(b.i64(0), lead, b.i64(1)), keepdims=0, noop_with_empty_axes=1)
            return self._reduce_ones(grad, target)
        if rs > rt:
            grad = b.ReduceSum(grad, b.i64(list(range(rs - rt))), keepdims=0)
        static_axes, unsure = [], False
        for i in range(rt):
            dt, ds = target.shape[i], source.shape[rs - rt + i]
            if same_dim(dt, ds) or (isinstance(dt, int) and dt != 1):
                continue
            if dt == 1:
                static_axes.append(i)
            else:
                unsure = True
        if unsure:
            return self._reduce_ones(grad, target)
        return b.ReduceSum(grad, b.i64(static_axes), keepdims=1) if static_axes else grad

    def _reduce_ones(self, grad: ir.Value, target: ir.Value) -> ir.Value:
        """Run-time form: reduce (keeping dims) every axis where target has 1 and ĝ has more."""
        b = self.b
        one = b.i64(1)
        axes = b.Reshape(b.NonZero(b.And(b.Equal(b.Shape(target), one), b.Not(b.Equal(b.Shape(grad), one)))),
                         b.i64([-1]))
        return b.ReduceSum(grad, axes, keepdims=1, noop_with_empty_axes=1)

    def local_rule(self, node: ir.Node, local: Local, grad: ir.Value):
        record = self.plan.get(node)
        if record is not None:
            return rules.LRP_RULES[record.rule](local, grad, **record.params)
        row = rules.VJP.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if row is None:
            where = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise LrpcError(f"no relevance rule for op {where} at node '{node.name}', which relevance flows "
                            "through; `lrpc ops` lists the supported ops")
        return row(local, grad)

    def run(self, seeds: dict[ir.Value, ir.Value], wanted: set[ir.Value]) -> dict[ir.Value, ir.Value]:
        """Walk the forward nodes backwards from the seeds; return ĝ for every wanted tensor it reaches."""
        pending: dict[ir.Value, list[ir.Value]] = {v: [g] for v, g in seeds.items()}
        found: dict[ir.Value, ir.Value] = {}

        def total(value):
            parts = pending.pop(value, None)
            if not parts:
                return None
            grad = parts[0] if len(parts) == 1 else self.b.Sum(*parts)
            if value in wanted:
                found[value] = grad
            return grad

        for node in reversed(list(self.graph)):
            grads = [total(o) for o in node.outputs]
            first = next((g for g in grads if g is not None), None)
            if first is None:
                continue
            local = Local(self, node, grads)
            sent = self.local_rule(node, local, grads[0] if grads[0] is not None else local.zeros_like_out(0))
            if isinstance(sent, dict):
                targets = list(sent.items())
            else:
                targets = list(zip(node.inputs, sent))
            for i, (value, thunk) in enumerate(targets):
                if thunk is None or value is None or value not in self.carrying:
                    continue
                grad = thunk()
                if node.op_type in rules.BROADCASTING and not isinstance(sent, dict):
                    grad = self.unbroadcast(grad, value, node.outputs[0])
                pending.setdefault(value, []).append(grad)
        for value in list(pending):
            total(value)  # graph inputs: whatever reached them
        return found
