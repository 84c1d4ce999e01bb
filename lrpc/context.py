"""What a local rule sees of its node (docs/design.md, "Relevance semantics"): the rule interface.

A rule — an op's VJP in lrpc.ops or an AttnLRP rule in lrpc.rules — is `rule(n, g, **params)`: `n` is a
Context, `g` the ĝ of the node's first output. It reads forward values through `n` (float32, the
explained row when ĝ is one row), builds with `n.b`, and asks the walk through the named methods below;
it never touches the walk itself.

ĝ axes: ĝ of a tensor has the tensor's axes, and under --targets one more in front: a K axis
(docs/design.md, "Many targets: the K axis"), ĝ [K, *shape]. Forward values broadcast against it as they stand; a rule that
names an axis of ĝ maps it with `grad_axis` / `grad_axes` / `grad_perm`, and shapes ĝ with `grad_shape`
/ `grad_zeros`, so the K axis changes the mapping, not the rules.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from lrpc.graph import attr, rank, static_value

F32 = ir.DataType.FLOAT


class Context:
    """One node as its rule sees it: forward values (as float32), attributes, the builder, ĝ of its outputs."""

    def __init__(self, walk, node: ir.Node, grads: list[ir.Value | None], compact=None):
        self._walk, self.node, self.b, self.grads = walk, node, walk.b, grads
        self.inputs = node.inputs
        self.compact = compact   # a lrpc.rows.RowPlan when ĝ is one sequence row, else None
        self._cache: dict[str, object] = {}

    # ---- the node's forward values ---------------------------------------------------------------
    def raw(self, i: int) -> ir.Value:
        return self.node.inputs[i]

    def raw_out(self, i: int = 0) -> ir.Value:
        return self.node.outputs[i]

    def x(self, i: int) -> ir.Value:
        v = self.node.inputs[i]
        axis = self.compact.rows.get(v) if self.compact is not None else None
        return self._walk.as_f32(v) if axis is None else self._row(v, axis)

    def y(self, i: int = 0) -> ir.Value:
        v = self.node.outputs[i]
        return self._walk.as_f32(v) if self.compact is None else self._row(v, self.compact.axis)

    def f32(self, value: ir.Value) -> ir.Value:
        """A forward value as the rules read it (float32; its explained row when ĝ is row-compact and the
        value varies along the sequence, aligned to the node's output as broadcasting aligns it)."""
        if self.compact is not None:
            axis = self._walk.rows.row_axis(value, self.compact.axis, self.compact.rank)
            if axis is not None:
                return self._row(value, axis)
        return self._walk.as_f32(value)

    def _row(self, value: ir.Value, axis: int) -> ir.Value:
        """The explained row of a forward value, as float32. The row is taken after the cast: a float16
        tensor read only through Casts to float32 keeps onnxruntime's float32 chain of the forward (a
        GatherND of the float16 tensor would make it round there, and the model's outputs move by an ulp)."""
        return self._walk.rows.row(self._walk.as_f32(value), axis)

    @property
    def stacked(self) -> bool:
        """ĝ is the K targets' rows stacked along the sequence axis (--targets; lrpc.rows)."""
        return self.compact is not None and self._walk.rows.stacked is not None

    def apart(self, value: ir.Value, i: int | None = None) -> ir.Value:
        """Under --targets, a one-row ĝ of this rule (`i` None) or input i's forward row with each target's row in
        its own K slice, [K, batch, …, 1, …] (lrpc.rows.Rows.apart): a product of two such rows is each target's
        own outer product, where the stacked rows would sum the K targets. As it stands otherwise."""
        rows = self._walk.rows
        if not self.stacked:
            return value
        if i is None:
            return rows.apart(value, self.compact.axis, self.compact.rank)
        v = self.node.inputs[i]
        return rows.apart(value, self.compact.rows[v], v.shape.rank(), grad=False)

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def rank(self, i: int) -> int | None:
        return rank(self.node.inputs[i])

    def const(self, i: int):
        return static_value(self.node.inputs[i])

    # ---- ĝ's shape -------------------------------------------------------------------------------
    @property
    def lead(self) -> int:
        """How many axes ĝ has in front of the forward tensor's own (1 under --targets: the K axis)."""
        return self._walk.lead

    @property
    def k_shape(self) -> ir.Value | None:
        """The run-time [K] of ĝ's K axis (None without one)."""
        return self._walk.k_shape

    def grad_axis(self, axis: int) -> int:
        """The axis of ĝ that holds the forward tensor's `axis` (a negative axis counts from the end, the
        same in both)."""
        return axis + self.lead if axis >= 0 else axis

    def grad_axes(self, axes: ir.Value) -> ir.Value:
        """grad_axis of a run-time int64 tensor of axes."""
        if not self.lead:
            return axes
        b = self.b
        return b.Add(axes, b.Cast(b.GreaterOrEqual(axes, b.i64(0)), to=7))

    def grad_perm(self, perm: list[int]) -> list[int]:
        """A Transpose perm of the forward tensor's axes as a perm of ĝ's (the K axis stays in front)."""
        return list(range(self.lead)) + [self.lead + int(p) for p in perm]

    def dims(self, i: int) -> list | None:
        """Input i's ĝ dims: its own, K in front under --targets; where that ĝ is one row, the row's dims
        (lrpc.rows: sequence dim 1, or the K rows stacked there behind a lead of 1). None if rank unknown."""
        v = self.node.inputs[i]
        if v is None or v.shape is None:
            return None
        axis = self.compact.grads.get(v) if self.compact is not None else None
        if axis is not None:
            return self._walk.rows.row_dims(list(v.shape), axis)
        return ([self._walk.k_dim] if self.lead else []) + list(v.shape)

    def grad_shape(self, i: int) -> ir.Value:
        """A Reshape target giving input i's ĝ its shape (`dims`): static where it can be, else read at run time."""
        target = self.b.reshape_shape(self.dims(i))
        if target is not None:
            return target
        v, b = self.node.inputs[i], self.b
        axis = self.compact.grads.get(v) if self.compact is not None else None
        if axis is None:
            return self._grad_shape_of(v)
        if not self.lead:
            return b.Concat(b.Shape(v, end=axis), b.i64([1]), b.Shape(v, start=axis + 1), axis=0)
        return b.Concat(b.i64([1]), b.Shape(v, end=axis), self.k_shape, b.Shape(v, start=axis + 1), axis=0)

    def _grad_shape_of(self, v: ir.Value) -> ir.Value:
        """The run-time shape of a whole ĝ of v."""
        b = self.b
        return b.Shape(v) if not self.lead else b.Concat(self._walk.k_shape, b.Shape(v), axis=0)

    def grad_zeros(self, i: int) -> ir.Value:
        """Zeros shaped like input i's whole ĝ (a scatter's base)."""
        return self.zeros_like(self._grad_shape_of(self.node.inputs[i]))

    def unbroadcast(self, grad: ir.Value, i: int, core: int = 0) -> ir.Value:
        return self._walk.unbroadcast(grad, self.node.inputs[i], self.node.outputs[0], core)

    def unbroadcast_to(self, grad: ir.Value, target: ir.Value, source: ir.Value) -> ir.Value:
        return self._walk.unbroadcast(grad, target, source)

    def zeros_like(self, shape: ir.Value) -> ir.Value:
        return self.b.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=F32))

    def zeros_like_out(self, i: int) -> ir.Value:
        """Zeros shaped like output i's whole ĝ."""
        return self.zeros_like(self._grad_shape_of(self.node.outputs[i]))

    def cached(self, key: str, make: Callable):
        """A getter that emits `make()` once, on first use (shared by the thunks of several inputs)."""
        def get():
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]
        return get

    # ---- questions to the walk -------------------------------------------------------------------
    def carries(self, which: int | ir.Value | None) -> bool:
        """Whether input `which` (an index, or any tensor) carries relevance."""
        value = self.node.inputs[which] if isinstance(which, int) else which
        return value is not None and value in self._walk.carrying

    def value(self, name: str) -> ir.Value:
        """The relevance-carrying tensor named `name` (a region input a plan record names)."""
        return self._walk.values[name]

    def rule_of(self, node: ir.Node) -> str | None:
        """The rule name the plan gives `node` (None: its op's exact VJP)."""
        return self._walk.rule_of(node)

    def view(self, node: ir.Node | str) -> "Context":
        """Another node (or the node of that name) as a rule would see it, without ĝ of its own."""
        node = self._walk.nodes[node] if isinstance(node, str) else node
        return self if node is self.node else Context(self._walk, node, [None])

    def passes_through(self, value: ir.Value) -> bool:
        """Whether `value` only hands ĝ on to its producer (one forward reader, not an output, not asked for,
        no condition), so this rule may send ĝ past it."""
        return self._walk.passes_through(value)

    def accumulated(self, value: ir.Value) -> ir.Value | None:
        """The ĝ the walk has summed for `value` (a tensor after this node, all of whose readers ran), in
        this node's layout (one row when this node's ĝ is), with `value` readable in it; else None."""
        return self._walk.accumulated(value, self.compact)
