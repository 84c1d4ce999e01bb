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

    compact = False  # set by the emitter when ĝ is one sequence row (see Emitter "row-compact ĝ")

    def x(self, i: int) -> ir.Value:
        return self.em.as_f32(self._row(self.node.inputs[i]))

    def y(self, i: int = 0) -> ir.Value:
        return self.em.as_f32(self._row(self.node.outputs[i]))

    def _row(self, value: ir.Value) -> ir.Value:
        return self.em.row(value) if self.compact and self.em.is_seq(value) else value

    def dims(self, i: int) -> list | None:
        """Input i's dims as the rule sees it (sequence dim 1 when ĝ is row-compact), None if rank unknown."""
        v = self.node.inputs[i]
        if v is None or v.shape is None:
            return None
        dims = list(v.shape)
        if self.compact and self.em.is_seq(v):
            dims[1] = 1
        return dims

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def rank(self, i: int) -> int | None:
        return rank(self.node.inputs[i])

    def const(self, i: int):
        return const_array(self.node.inputs[i])

    def value(self, name: str) -> ir.Value:
        return self.em.values[name]

    def f32(self, value: ir.Value) -> ir.Value:
        """A forward value as the rules read it (float32; its explained row when ĝ is row-compact)."""
        return self.em.as_f32(self._row(value))

    def cached(self, key: str, make: Callable):
        def get():
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]
        return get

    def unbroadcast(self, grad: ir.Value, i: int, core: int = 0) -> ir.Value:
        return self.em.unbroadcast(grad, self.node.inputs[i], self.node.outputs[0], core)

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
        # row-compact ĝ: with a one-hot seed at one sequence position, ĝ of the tensors after the last
        # sequence-mixing op is zero except in that row. Such ĝ are kept as [batch, 1, …] (`_compact`)
        # and the position-wise rules (linear layers, elementwise ops, norms, activation regions) run on
        # that row alone; ĝ is widened (× one-hot row mask) where it meets any other op.
        self._compact: set[ir.Value] = set()
        self._rows: dict[ir.Value, ir.Value] = {}
        self._seq = None   # (batch dim, sequence dim, [batch, 1] row index, [batch, seq, 1] row mask)
        self.totals: dict[ir.Value, ir.Value] = {}  # ĝ of every tensor the walk reached (lrpc.checkpoint)

    def as_f32(self, value: ir.Value) -> ir.Value:
        """Forward values enter the rules in float32 (relevance is float32 even for fp16/bf16 models)."""
        if value.dtype == F32:
            return value
        if value not in self._f32:
            self._f32[value] = self.b.Cast(value, to=F32)
        return self._f32[value]

    def unbroadcast(self, grad: ir.Value, target: ir.Value, source: ir.Value, core: int = 0) -> ir.Value:
        """Sum ĝ (shaped like `source`) over the axes that broadcasting added to `target`. The last `core`
        axes were not broadcast (MatMul's matrix dims: ĝ already has the target's there)."""
        b = self.b
        rt, rs = rank(target), rank(source)
        if rt is None or rs is None:
            lead = b.Sub(b.Size(b.Shape(grad)), b.Size(b.Shape(target)))
            grad = b.ReduceSum(grad, b.Range(b.i64(0), lead, b.i64(1)), keepdims=0, noop_with_empty_axes=1)
            return self._reduce_ones(grad, target)
        if rs > rt:
            grad = b.ReduceSum(grad, b.i64(list(range(rs - rt))), keepdims=0)
        static_axes, unsure = [], False
        for i in range(rt - core):
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

    # ---- row-compact ĝ ----------------------------------------------------------------------
    ROW_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Dropout", "Sum", "Pow", "Sqrt",
               "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Erf", "Gelu",
               "Softplus", "Mish", "Abs", "Sin", "Cos", "HardSigmoid"}
    ROW_RULES = {"frozen", "identity", "layernorm-frozen-std", "rmsnorm-frozen-rms", "uniform"}

    def _compact_seed(self, seed: ir.Value):
        """The [batch, 1, classes] row of contract.seed's one-hot-at-position seed, or None."""
        node = seed.producer()
        if node is None or node.op_type != "Mul" or len(node.inputs) != 2:
            return None
        mask, row = (v.producer() for v in node.inputs)
        onehot = mask.inputs[0].producer() if mask is not None and mask.op_type == "Unsqueeze" else None
        if onehot is None or onehot.op_type != "OneHot" or row is None or row.op_type != "Unsqueeze":
            return None
        position = onehot.inputs[0]
        if position is None or position not in self.graph.inputs:
            return None
        return position, node.inputs[1]

    def is_seq(self, value: ir.Value) -> bool:
        """A [batch, seq, …] rank-3 tensor of the explained output's batch and sequence."""
        if self._seq is None or value is None or value.shape is None or value.shape.rank() != 3:
            return False
        batch, seq = self._seq[:2]
        return same_dim(value.shape[0], batch) and same_dim(value.shape[1], seq)

    def row(self, value: ir.Value) -> ir.Value:
        """value[b, position[b]] as [batch, 1, …]."""
        if value not in self._rows:
            b = self.b
            row = b.Unsqueeze(b.GatherND(value, self._seq[2], batch_dims=1), b.i64([1]))
            row.dtype = value.dtype  # known, so as_f32 adds no Cast to a float32 row
            row.shape = ir.Shape([value.shape[0], 1, *list(value.shape)[2:]])
            self._rows[value] = row
        return self._rows[value]

    def widen(self, grad: ir.Value) -> ir.Value:
        if grad not in self._compact:
            return grad
        return self.b.Mul(grad, self._seq[3])

    def _row_local(self, node: ir.Node, grads: list) -> bool:
        """Whether the node's rule maps ĝ rows to ĝ rows (every relevance input and output is [batch, seq, …],
        every other operand is a constant that does not vary along the sequence)."""
        if not grads or any(g is not None and g not in self._compact for g in grads) or len(node.outputs) != 1:
            return False
        record = self.plan.get(node)
        if record is not None:
            if record.rule not in self.ROW_RULES or (record.rule == "uniform" and node.op_type != "Mul"):
                return False
            if record.rule == "identity" and not self.is_seq(self.values.get(record.params.get("input"))):
                return False
            if record.rule in ("layernorm-frozen-std", "rmsnorm-frozen-rms") and node.attributes.get("axis") \
                    is not None and node.attributes["axis"].value not in (-1, 2):
                return False
        elif node.domain not in ("", "ai.onnx"):
            return False
        elif node.op_type == "MatMul":
            w = node.inputs[1]
            if w in self.carrying or w.shape is None or w.shape.rank() != 2:
                return False
        elif node.op_type == "LayerNormalization":
            if node.attributes.get("axis") is not None and node.attributes["axis"].value not in (-1, 2):
                return False
        elif node.op_type not in self.ROW_OPS:
            return False
        if not self.is_seq(node.outputs[0]):
            return False
        for i, v in enumerate(node.inputs):
            if v is None or self.is_seq(v) or (node.op_type == "MatMul" and i == 1):
                continue
            if v in self.carrying or v.shape is None:
                return False
            r = v.shape.rank()
            if r >= 2 and not (r == 3 and v.shape[1] == 1 and (v.shape[0] == 1 or same_dim(v.shape[0], self._seq[0]))):
                return False
        return True

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
        if len(seeds) == 1:
            (y, full), = seeds.items()
            compact = self._compact_seed(full) if y.shape is not None and y.shape.rank() == 3 else None
            if compact is not None:
                b, (position, row) = self.b, compact
                seq = b.Shape(y, start=1, end=2)
                index = b.Unsqueeze(b.Mod(position, seq), b.i64([1]))
                mask = b.Unsqueeze(b.OneHot(position, seq, b.f32([0.0, 1.0]), axis=-1), b.i64([-1]))
                self._seq = (y.shape[0], y.shape[1], index, mask)
                pending[y] = [row]
                self._compact.add(row)

        def total(value):
            parts = pending.pop(value, None)
            if not parts:
                return None
            if len(parts) > 1 and not all(p in self._compact for p in parts):
                parts = [self.widen(p) for p in parts]
            grad = parts[0] if len(parts) == 1 else self.b.Sum(*parts)
            if all(p in self._compact for p in parts):
                self._compact.add(grad)
            self.totals[value] = grad
            if value in wanted:
                found[value] = self.widen(grad)
            return grad

        for node in reversed(list(self.graph)):
            grads = [total(o) for o in node.outputs]
            first = next((g for g in grads if g is not None), None)
            if first is None:
                continue
            row_local = self._row_local(node, grads)
            if not row_local:
                grads = [None if g is None else self.widen(g) for g in grads]
            local = Local(self, node, grads)
            local.compact = row_local
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
                if row_local:
                    self._compact.add(grad)
                pending.setdefault(value, []).append(grad)
        for value in list(pending):
            total(value)  # graph inputs: whatever reached them
        return found
