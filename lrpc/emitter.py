"""The relevance emitter: one reverse walk over the forward graph, one local rule per node.

Like reverse-mode autodiff: the modified gradient ĝ of every relevance-carrying tensor is the sum
of what its consumers' local rules send back; a node's rule is the plan's record for it (an AttnLRP
rule) or else its op's exact VJP from `rules.VJP`. Nothing is emitted for tensors that carry no
relevance, so no weight gradient is ever computed. All ĝ are float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx_ir as ir

from lrpc import rules
from lrpc.errors import LrpcError
from lrpc.graph import FLOAT_TYPES, Builder, attr, rank, same_dim, static_value
from lrpc.plan import Plan

F32 = ir.DataType.FLOAT


class _NotRowLocal(Exception):
    pass


@dataclass
class RowPlan:
    """A rule run on one sequence row: ĝ of the output is one row along `axis` (of a rank-`rank` tensor)."""
    axis: int
    rank: int
    rows: dict = field(default_factory=dict)    # forward input → the axis it is read as a row along
    grads: dict = field(default_factory=dict)   # carrying input → axis of its one-row ĝ (None: whole ĝ)


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

    compact: "RowPlan | None" = None  # set by the emitter when ĝ is one sequence row (Emitter "row-compact ĝ")

    def x(self, i: int) -> ir.Value:
        v = self.node.inputs[i]
        axis = self.compact.rows.get(v) if self.compact is not None else None
        return self.em.as_f32(v if axis is None else self.em.row(v, axis))

    def y(self, i: int = 0) -> ir.Value:
        v = self.node.outputs[i]
        return self.em.as_f32(v if self.compact is None else self.em.row(v, self.compact.axis))

    def dims(self, i: int) -> list | None:
        """Input i's dims as its ĝ has them (sequence dim 1 where that ĝ is one row), None if rank unknown."""
        v = self.node.inputs[i]
        if v is None or v.shape is None:
            return None
        dims = list(v.shape)
        axis = self.compact.grads.get(v) if self.compact is not None else None
        if axis is not None:
            dims[axis] = 1
        return dims

    def grad_shape(self, i: int) -> ir.Value:
        """A Reshape target giving input i's ĝ its shape (`dims`): static where it can be, else read at run time."""
        target = self.b.reshape_shape(self.dims(i))
        if target is not None:
            return target
        v, b = self.node.inputs[i], self.b
        axis = self.compact.grads.get(v) if self.compact is not None else None
        if axis is None:
            return b.Shape(v)
        return b.Concat(b.Shape(v, end=axis), b.i64([1]), b.Shape(v, start=axis + 1), axis=0)

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def rank(self, i: int) -> int | None:
        return rank(self.node.inputs[i])

    def const(self, i: int):
        return static_value(self.node.inputs[i])

    def value(self, name: str) -> ir.Value:
        return self.em.values[name]

    def f32(self, value: ir.Value) -> ir.Value:
        """A forward value as the rules read it (float32; its explained row when ĝ is row-compact and the
        value varies along the sequence, aligned to the node's output as broadcasting aligns it)."""
        if self.compact is not None:
            axis = self.em.row_axis(value, self.compact.axis, self.compact.rank)
            if axis is not None:
                return self.em.as_f32(self.em.row(value, axis))
        return self.em.as_f32(value)

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
        # sequence-mixing op is zero except in that row. Such ĝ are kept with the sequence dim 1 (`_compact`)
        # and the rules that map rows to rows (linear layers, elementwise ops, norms, activation regions,
        # reshapes and transposes, and the query side of attention: softmax over keys, the score and
        # value products) run on that row alone; ĝ is widened (× one-hot row mask) where it meets any
        # other op. Through attention the row reaches the keys and values as whole (outer-product) ĝ.
        self._compact: dict[ir.Value, tuple[int, int]] = {}   # one-row ĝ → (its sequence axis, its rank)
        self._rows: dict[tuple[ir.Value, int], ir.Value] = {}
        self._masks: dict[tuple[int, int], ir.Value] = {}
        # (batch dim, sequence dim, [batch, 1] row index, [batch, seq] one-hot row, [batch] row index)
        self._seq = None
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
    ROW_RULES = {"frozen", "gated", "identity", "layernorm-frozen-std", "rmsnorm-frozen-rms", "uniform", "softmax"}
    NORMS = {"LayerNormalization", "RMSNormalization"}

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

    def is_seq(self, value: ir.Value | None, axis: int) -> bool:
        """value is [batch, …] with the explained output's sequence at `axis`."""
        if self._seq is None or value is None or value.shape is None or not 0 < axis < value.shape.rank():
            return False
        batch, seq = self._seq[:2]
        return same_dim(value.shape[0], batch) and same_dim(value.shape[axis], seq)

    def row_axis(self, value: ir.Value | None, axis: int, rank_: int) -> int | None:
        """The axis of `value` (broadcast against a rank-`rank_` tensor) that holds the sequence `axis`, when
        value varies along it and its row can be read; None when value is constant along the sequence."""
        if value is None or value.shape is None or value.shape.rank() > rank_:
            raise _NotRowLocal
        a = axis - (rank_ - value.shape.rank())
        if a < 0 or value.shape[a] == 1:
            return None
        batch_ok = value.shape.rank() == rank_ and (value.shape[0] == 1 or same_dim(value.shape[0], self._seq[0]))
        if a >= 1 and batch_ok and same_dim(value.shape[a], self._seq[1]):
            return a
        raise _NotRowLocal

    def readable(self, value: ir.Value | None, axis: int, rank_: int) -> bool:
        """Whether a rule on a one-row ĝ can read `value` (whole, or its row)."""
        try:
            self.row_axis(value, axis, rank_)
            return True
        except _NotRowLocal:
            return False

    def row(self, value: ir.Value, axis: int = 1) -> ir.Value:
        """value[b, …, position[b], …] with the position at `axis`, kept as a dim of size 1."""
        key = (value, axis)
        if key not in self._rows:
            b = self.b
            index, flat = self._seq[2], self._seq[4]
            if axis == 1 and same_dim(value.shape[0], self._seq[0]):
                row = b.Unsqueeze(b.GatherND(value, index, batch_dims=1), b.i64([1]))
            elif value.shape[0] == 1:  # batch-broadcast data: the positions of all batch rows, moved to axis 0
                perm = list(range(value.shape.rank()))
                perm[0], perm[axis] = axis, 0
                row = b.Transpose(b.Gather(value, flat, axis=axis), perm=perm)
            else:
                r = value.shape.rank()
                spread = b.Concat(b.i64([1]), *([b.Shape(value, start=1, end=axis)] if axis > 1 else []), b.i64([1]),
                                  *([b.Shape(value, start=axis + 1)] if axis + 1 < r else []), axis=0)
                where = b.Expand(b.Reshape(flat, b.i64([-1] + [1] * (r - 1))), spread)
                row = b.GatherElements(value, where, axis=axis)
            row.dtype = value.dtype  # known, so as_f32 adds no Cast to a float32 row
            dims = list(value.shape)
            dims[0], dims[axis] = self._seq[0], 1
            row.shape = ir.Shape(dims)
            self._rows[key] = row
        return self._rows[key]

    def compact_of(self, grad: ir.Value) -> tuple[int, int] | None:
        """(sequence axis, rank) of a one-row ĝ, None for a whole one."""
        return self._compact.get(grad)

    def widen(self, grad: ir.Value) -> ir.Value:
        if grad not in self._compact:
            return grad
        axis, rank_ = self._compact[grad]
        key = (axis, rank_)
        if key not in self._masks:  # the [batch, seq] one-hot, with seq at `axis` of a rank-`rank_` tensor
            self._masks[key] = self.b.Unsqueeze(self._seq[3], self.b.i64([a for a in range(1, rank_) if a != axis]))
        return self.b.Mul(grad, self._masks[key])

    def _row_plan(self, node: ir.Node, grads: list) -> RowPlan | None:
        """How the node's rule maps a one-row ĝ: which inputs' ĝ stay one row (and along which axis), which
        forward inputs it reads as rows. None when the rule needs the whole ĝ (it is widened first)."""
        if len(node.outputs) != 1 or not grads or grads[0] not in self._compact:
            return None
        axis, rank_ = self._compact[grads[0]]
        out = node.outputs[0]
        if not self.is_seq(out, axis) or out.shape.rank() != rank_ or node.domain not in ("", "ai.onnx"):
            return None
        try:
            return self._classify(node, axis, rank_)
        except _NotRowLocal:
            return None

    def _classify(self, node: ir.Node, axis: int, rank_: int) -> RowPlan | None:
        record = self.plan.get(node)
        rule, op = (record.rule if record is not None else None), node.op_type
        plan = RowPlan(axis, rank_)
        carried = [v for v in node.inputs if v is not None and v in self.carrying]

        def same_row(v):  # a carrying operand whose ĝ is one row along the same axis
            if not self.is_seq(v, axis) or v.shape.rank() != rank_:
                raise _NotRowLocal
            plan.rows[v] = plan.grads[v] = axis

        def read(v):  # a forward operand the rule may read: its row where it varies along the sequence
            a = self.row_axis(v, axis, rank_)
            if a is not None:
                plan.rows[v] = a

        if rule is not None and rule not in self.ROW_RULES:
            return None
        if op == "MatMul" and (rule is None or rule == "uniform"):
            a, w = node.inputs
            if w.shape is not None and w.shape.rank() == 2 and w not in self.carrying:
                if not (self.is_seq(a, axis) and a.shape.rank() == rank_ and axis <= rank_ - 2):
                    return None   # ĝ·Wᵀ of a row is a row
                plan.rows[a] = plan.grads[a] = axis
                return plan
            if axis != rank_ - 2 or a.shape is None or a.shape.rank() != rank_:
                return None      # a @ b with the sequence along a's rows: ĝ_a a row, ĝ_b = a_rowᵀ·ĝ whole
            same_row(a) if a in self.carrying else read(a)
            if w in self.carrying:
                plan.grads[w] = None
            return plan
        if rule == "identity":
            u = self.values.get(record.params.get("input"))
            same_row(u)
            for v in node.inputs:
                if v is not None and v is not u:
                    read(v)
            return plan
        if op in self.NORMS or rule in ("layernorm-frozen-std", "rmsnorm-frozen-rms"):
            norm_axis = attr(node, "axis", -1)
            if (norm_axis % rank_) <= axis:
                return None
        elif op == "Softmax" or rule == "softmax":
            if attr(node, "axis", -1) % rank_ == axis:
                return None
        elif op == "Reshape":
            x = node.inputs[0]
            if x.shape is None or x.shape.rank() <= axis or \
                    not all(same_dim(d, e) for d, e in zip(list(x.shape)[:axis + 1], list(node.outputs[0].shape)[:axis + 1])):
                return None
            plan.grads[x] = axis
            return plan
        elif op == "Transpose":
            perm = attr(node, "perm")
            if perm is None or perm[0] != 0:
                return None
            plan.grads[node.inputs[0]] = perm[axis]
            return plan
        elif op == "Slice":   # along other axes, with bounds known at compile time (a constant Pad back)
            axes = static_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if axes is None or any(int(a) % rank_ == axis for a in axes) or any(
                    static_value(v) is None for v in node.inputs[1:] if v is not None):
                return None
            same_row(node.inputs[0])
            return plan
        elif op == "Concat":
            if attr(node, "axis") % rank_ == axis:
                return None
        elif op not in self.ROW_OPS and rule not in ("frozen", "gated", "uniform"):
            return None
        for v in node.inputs:
            if v is None:
                continue
            if v in self.carrying:
                same_row(v)
            elif v.dtype in FLOAT_TYPES:
                read(v)
        if not carried:
            return None
        return plan

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
                flat = b.Mod(position, seq)
                onehot = b.OneHot(position, seq, b.f32([0.0, 1.0]), axis=-1)
                self._seq = (y.shape[0], y.shape[1], b.Unsqueeze(flat, b.i64([1])), onehot, flat)
                pending[y] = [row]
                self._compact[row] = (1, 3)

        def total(value):
            parts = pending.pop(value, None)
            if not parts:
                return None
            if len({self._compact.get(p) for p in parts}) > 1 or parts[0] not in self._compact:
                parts = [self.widen(p) for p in parts]
            grad = parts[0] if len(parts) == 1 else self.b.Sum(*parts)
            if parts[0] in self._compact:
                self._compact[grad] = self._compact[parts[0]]
            self.totals[value] = grad
            if value in wanted:
                found[value] = self.widen(grad)
            return grad

        for node in reversed(list(self.graph)):
            grads = [total(o) for o in node.outputs]
            first = next((g for g in grads if g is not None), None)
            if first is None:
                continue
            row_plan = self._row_plan(node, grads)
            if row_plan is None:
                grads = [None if g is None else self.widen(g) for g in grads]
            local = Local(self, node, grads)
            local.compact = row_plan
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
                if row_plan is not None and row_plan.grads.get(value) is not None:
                    self._compact[grad] = (row_plan.grads[value], value.shape.rank())
                pending.setdefault(value, []).append(grad)
        for value in list(pending):
            total(value)  # graph inputs: whatever reached them
        return found
