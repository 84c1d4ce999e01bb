"""The relevance emitter: one reverse walk over the forward graph, one local rule per node.

Like reverse-mode autodiff: the modified gradient ĝ of every relevance-carrying tensor is the sum
of what its consumers' local rules send back; a node's rule is the plan's record for it (an AttnLRP
rule, lrpc.rules) or else its op's exact VJP (lrpc.ops). Nothing is emitted for tensors that carry no
relevance, so no weight gradient is ever computed. All ĝ are float32 whatever the model's dtype.
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc import ops, rules
from lrpc.context import Context
from lrpc.errors import LrpcError
from lrpc.graph import PREFIX, Builder, rank, same_dim
from lrpc.plan import Plan
from lrpc.rows import Rows

F32 = ir.DataType.FLOAT


class Emitter:
    def __init__(self, graph: ir.Graph, plan: Plan, carrying: set[ir.Value], builder: Builder):
        self.graph, self.plan, self.carrying, self.b = graph, plan, carrying, builder
        self.values = {v.name: v for v in carrying}
        self.nodes = {n.name: n for n in graph}
        self._f32: dict[ir.Value, ir.Value] = {}
        self.rows = Rows(graph, carrying, builder)   # which ĝ are kept as one sequence row (lrpc.rows)
        self.totals: dict[ir.Value, ir.Value] = {}  # ĝ of every tensor the walk reached (lrpc.checkpoint)
        # With --targets, every ĝ has a leading K axis (docs/design.md, "Many targets: the K axis"): k_shape is its run-time [K],
        # k_dim its declared dim (an int or a name); None / None without one
        self.k_shape: ir.Value | None = None
        self.k_dim = None
        # conditional relevance (`condition`): tensor → the factor its summed ĝ is multiplied by, and per
        # condition (nodes computed from the tensor, those nodes' outputs and the tensor, the bypass factor)
        self.masks: dict[ir.Value, ir.Value] = {}
        self.gates: list[tuple[set[ir.Node], set[ir.Value], ir.Value]] = []
        self._wanted: set[ir.Value] = set()

    def with_targets(self, seed: ir.Value, k_dim) -> None:
        """Give every ĝ of this walk a leading K axis, sized like the seed's first axis."""
        node = seed.producer()
        if node is not None and node.op_type == "Mul":
            # contract.seed's one-hot product [K, batch, seq, classes]: read K off a factor (both lead with
            # it), or the product, which row compaction never uses, is made for its Shape alone
            seed = node.inputs[0]
        self.k_shape = self.b.Shape(seed, end=1)
        self.k_dim = k_dim if isinstance(k_dim, int) else ir.SymbolicDim(k_dim)

    def condition(self, value: ir.Value, mask: ir.Value, bypass: ir.Value) -> None:
        """Conditional relevance (CRP; docs/design.md, "Conditional heatmaps"): ĝ of `value`, once summed, is
        multiplied by `mask`, and ĝ that a node computed from `value` sends to a tensor computed without it —
        relevance that reaches the inputs bypassing `value` (a residual connection, a parallel branch) — by
        `bypass`. Call before `run`: the walk's own nodes are not yet in the graph."""
        inside, computed, stack = {value}, set(), [value]
        while stack:
            for node, _ in stack.pop().uses():
                if node not in computed:
                    computed.add(node)
                    stack.extend(o for o in node.outputs if o not in inside)
                    inside.update(node.outputs)
        self.masks[value] = mask
        self.gates.append((computed, inside, bypass))

    def _gated(self, node: ir.Node, value: ir.Value, grad: ir.Value) -> ir.Value:
        for computed, inside, bypass in self.gates:
            if node in computed and value not in inside:
                grad = self.b.Mul(grad, bypass)
        return grad

    @property
    def lead(self) -> int:
        """How many axes ĝ has in front of its tensor's own: 1 with a K axis, else 0."""
        return 0 if self.k_shape is None else 1

    def as_f32(self, value: ir.Value) -> ir.Value:
        """Forward values enter the rules in float32 (relevance is float32 even for fp16/bf16 models)."""
        if value.dtype == F32:
            return value
        if value not in self._f32:
            cast = self._f32[value] = self.b.Cast(value, to=F32)
            cast.shape, cast.dtype = value.shape, F32   # (lrpc.rows reads a row of it by its shape)
        return self._f32[value]

    def unbroadcast(self, grad: ir.Value, target: ir.Value, source: ir.Value, core: int = 0) -> ir.Value:
        """Sum ĝ (shaped like `source`) over the axes that broadcasting added to `target`. The last `core`
        axes were not broadcast (MatMul's matrix dims: ĝ already has the target's there). A leading K axis
        of ĝ (self.lead) is kept."""
        b, lead = self.b, self.lead
        rt, rs = rank(target), rank(source)
        if rt is None or rs is None:
            end = b.Sub(b.Size(b.Shape(grad)), b.Size(b.Shape(target)))   # the added axes: [lead, end)
            grad = b.ReduceSum(grad, b.Range(b.i64(lead), end, b.i64(1)), keepdims=0, noop_with_empty_axes=1)
            return self._reduce_ones(grad, target)
        if rs > rt:
            grad = b.ReduceSum(grad, b.i64(list(range(lead, lead + rs - rt))), keepdims=0)
        static_axes, unsure = [], False
        for i in range(rt - core):
            dt, ds = target.shape[i], source.shape[rs - rt + i]
            if same_dim(dt, ds) or (isinstance(dt, int) and dt != 1):
                continue
            if dt == 1:
                static_axes.append(lead + i)
            else:
                unsure = True
        if unsure:
            return self._reduce_ones(grad, target)
        return b.ReduceSum(grad, b.i64(static_axes), keepdims=1) if static_axes else grad

    def _reduce_ones(self, grad: ir.Value, target: ir.Value) -> ir.Value:
        """Run-time form: reduce (keeping dims) every axis where target has 1 and ĝ has more (ĝ's K axis is
        compared with itself, so never reduced)."""
        b = self.b
        one = b.i64(1)
        shape = b.Shape(target) if self.k_shape is None else b.Concat(b.Shape(grad, end=1), b.Shape(target), axis=0)
        axes = b.Reshape(b.NonZero(b.And(b.Equal(shape, one), b.Not(b.Equal(b.Shape(grad), one)))),
                         b.i64([-1]))
        return b.ReduceSum(grad, axes, keepdims=1, noop_with_empty_axes=1)

    # ---- what a rule may ask (lrpc.context.Context) ------------------------------------------------
    def rule_of(self, node: ir.Node) -> str | None:
        record = self.plan.get(node)
        return record.rule if record is not None else None

    def passes_through(self, value: ir.Value) -> bool:
        """value only hands ĝ on to its producer: one forward reader, no graph output, not asked for, and no
        condition in this walk (a rule may then send ĝ past it)."""
        readers = [node for node, _ in value.uses() if not node.name.startswith(PREFIX)]
        return len(readers) == 1 and not value.is_graph_output() and value not in self._wanted and not self.masks

    def accumulated(self, value: ir.Value, compact) -> ir.Value | None:
        """ĝ of `value` summed so far, in the layout of a rule whose ĝ is one row (`compact`, a RowPlan) or
        whole (None); None when there is none, or it cannot be had in that layout."""
        grad = self.totals.get(value)
        if grad is None:
            return None
        row = (compact.axis, compact.rank) if compact is not None else None
        if row is not None and not self.rows.readable(value, *row):
            return None
        if self.rows.compact_of(grad) != row:
            if row is not None:
                return None
            grad = self.rows.widen(grad)
        return grad

    # ---- the walk ----------------------------------------------------------------------------------
    def _rule(self, node: ir.Node):
        """(rule function, its params, its row form): the plan's AttnLRP rule, else the op's exact VJP."""
        record = self.plan.get(node)
        if record is not None:
            rule = rules.RULES[record.rule]
            return rule.apply, record.params, rule.rows
        op = ops.lookup(node)
        if op is None or op.vjp is None:
            raise LrpcError(f"no relevance rule for op {ops.key(node)} at node '{node.name}', which relevance "
                            "flows through; `lrpc ops` lists the supported ops")
        return op.vjp, {}, op.rows

    def run(self, seeds: dict[ir.Value, ir.Value], wanted: set[ir.Value]) -> dict[ir.Value, ir.Value]:
        """Walk the forward nodes backwards from the seeds; return ĝ for every wanted tensor it reaches."""
        pending: dict[ir.Value, list[ir.Value]] = {v: [g] for v, g in seeds.items()}
        found: dict[ir.Value, ir.Value] = {}
        rows, self._wanted = self.rows, wanted
        if len(seeds) == 1:  # row compaction: one row per seed (per target under --targets)
            (y, full), = seeds.items()
            row = rows.start(y, full, None if self.k_shape is None else self.k_dim)
            if row is not None:
                pending[y] = [row]

        def total(value):
            parts = pending.pop(value, None)
            if not parts:
                return None
            if len({rows.compact_of(p) for p in parts}) > 1 or rows.compact_of(parts[0]) is None:
                parts = [rows.widen(p) for p in parts]
            grad = parts[0] if len(parts) == 1 else self.b.Sum(*parts)
            if value in self.masks:
                grad = self.b.Mul(grad, self.masks[value])
            rows.mark(grad, rows.compact_of(parts[0]))
            self.totals[value] = grad
            if value in wanted:
                found[value] = rows.widen(grad)
            return grad

        for node in reversed(list(self.graph)):
            grads = [total(o) for o in node.outputs]
            if all(g is None for g in grads):
                continue
            apply, params, row_form = self._rule(node)
            row_plan = rows.plan(node, grads, row_form, params)
            if row_plan is None:
                grads = [None if g is None else rows.widen(g) for g in grads]
            n = Context(self, node, grads, row_plan)
            sent = apply(n, grads[0] if grads[0] is not None else n.zeros_like_out(0), **params)
            direct = isinstance(sent, dict)   # a rule that sends past its own inputs: no broadcasting to undo
            op = ops.lookup(node)
            for value, thunk in (sent.items() if direct else zip(node.inputs, sent)):
                if thunk is None or value is None or value not in self.carrying:
                    continue
                grad = thunk()
                if not direct and op is not None and op.broadcasts:
                    grad = self.unbroadcast(grad, value, node.outputs[0])
                grad = self._gated(node, value, grad)
                if row_plan is not None and row_plan.grads.get(value) is not None:
                    rows.mark(grad, (row_plan.grads[value], value.shape.rank()))
                pending.setdefault(value, []).append(grad)
        for value in list(pending):
            total(value)  # graph inputs: whatever reached them
        return found
