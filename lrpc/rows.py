"""Row-compact ĝ (docs/design.md, "Pipeline"): with a one-hot seed at one sequence position, ĝ of the
tensors after the last sequence-mixing op is zero except in that row. Such ĝ are kept with the sequence
dim 1, and the rules that map rows to rows (linear layers, elementwise ops, norms, activation regions,
reshapes and transposes, and the query side of attention: softmax over keys, the score and value
products) run on that row alone; ĝ is widened (× one-hot row mask) where it meets any other op. Through
attention the row reaches the keys and values as whole (outer-product) ĝ.

Under --targets (docs/design.md, "Many targets: the K axis") target k's seed is one-hot at its own
position p_k, so its ĝ is nonzero only in row p_k: the K rows are kept *stacked along the sequence axis*
— ĝ [1, batch, …, K, …] with the leading K axis of size 1 and row k (target k's) in place of the sequence
— and the forward rows read are gathered at the K positions, [batch, …, K, …]. Row-local rules never mix
rows, so each target's row meets only its own forward row, and the forward values keep their rank. A rule
that makes a whole ĝ from the rows (a @ b with b carrying: ĝ_b = a_rowᵀ·ĝ_row) would sum the K targets over
the stacked rows: it first moves each target's row into its own K slice (Rows.apart, [K, batch, …, 1, …]),
so ĝ_b is each target's own outer product and the query side of the last attention stays K rows.

Which rules can run on a row is a *row form*, one function below per shape of argument; the op registry
(lrpc.ops) and the rule table (lrpc.rules) name each op's and each rule's form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lrpc.graph import FLOAT_TYPES, Builder, attr, is_input_check, same_dim, static_value


class NotRowLocal(Exception):
    """The rule cannot run on a one-row ĝ (it is widened first)."""


@dataclass
class RowPlan:
    """A rule run on one sequence row: ĝ of the output is one row along `axis` (of a rank-`rank` tensor)."""
    axis: int
    rank: int
    rows: dict = field(default_factory=dict)    # forward input → the axis it is read as a row along
    grads: dict = field(default_factory=dict)   # carrying input → axis of its one-row ĝ (None: whole ĝ)


class Rows:
    """The one-row ĝ of one walk: which ĝ are one row (and along which axis), the forward rows read."""

    def __init__(self, graph: ir.Graph, carrying: set[ir.Value], builder: Builder):
        self.graph, self.carrying, self.b = graph, carrying, builder
        self.values = {v.name: v for v in carrying}
        self._compact: dict[ir.Value, tuple[int, int]] = {}   # one-row ĝ → (its sequence axis, its rank)
        self._rows: dict[tuple[ir.Value, int], ir.Value] = {}
        self._masks: dict[tuple[int, int], ir.Value] = {}
        # (batch dim, sequence dim, [batch, 1] row index, [batch, seq] one-hot row, [batch] row index); under
        # --targets ([batch, K, 1] row indices, [K, batch, seq] one-hot rows, [batch, K] row indices)
        self._seq = None
        self.stacked = None   # under --targets: the declared K (the rows' dim along the sequence axis)

    def start(self, y: ir.Value, seed: ir.Value, k_dim=None) -> ir.Value | None:
        """The one-row form of the walk's seed ĝ of y, when it is contract.seed's one-hot-at-position seed;
        with `k_dim` (--targets), its K rows stacked along the sequence axis, [1, batch, K, classes]."""
        found = self._compact_seed(seed, k_dim is not None) if y.shape is not None and y.shape.rank() == 3 else None
        if found is None:
            return None
        b, (position, row) = self.b, found
        seq = b.Shape(y, start=1, end=2)
        flat = b.Mod(position, seq)
        onehot = b.OneHot(position, seq, b.f32([0.0, 1.0]), axis=-1)
        if k_dim is None:
            self._seq = (y.shape[0], y.shape[1], b.Unsqueeze(flat, b.i64([1])), onehot, flat)
        else:
            self.stacked = k_dim
            self._seq = (y.shape[0], y.shape[1], b.Unsqueeze(flat, b.i64([-1])),
                         b.Transpose(onehot, perm=[1, 0, 2]), flat)
            row = b.Transpose(row, perm=[2, 1, 0, 3])   # [K, batch, 1, classes] → [1, batch, K, classes]
        self._compact[row] = (1, 3)
        return row

    def _compact_seed(self, seed: ir.Value, targets: bool):
        """The [(K,) batch, 1, classes] row of contract.seed's one-hot-at-position seed, or None."""
        node = seed.producer()
        if node is None or node.op_type != "Mul" or len(node.inputs) != 2:
            return None
        mask, row = (v.producer() for v in node.inputs)
        onehot = mask.inputs[0].producer() if mask is not None and mask.op_type == "Unsqueeze" else None
        if targets and onehot is not None and onehot.op_type == "Transpose":   # [batch, K, seq] → [K, batch, seq]
            onehot = onehot.inputs[0].producer()
        if onehot is None or onehot.op_type != "OneHot" or row is None or row.op_type != "Unsqueeze":
            return None
        position = source = onehot.inputs[0]
        while source is not None and is_input_check(source.producer()):   # contract's in-graph range checks
            source = source.producer().inputs[0]
        if source is None or source not in self.graph.inputs:
            return None
        return position, node.inputs[1]   # the checked position: the check stays a data dependency

    # ---- one-row ĝ -------------------------------------------------------------------------------
    def compact_of(self, grad: ir.Value) -> tuple[int, int] | None:
        """(sequence axis, rank) of a one-row ĝ, None for a whole one."""
        return self._compact.get(grad)

    def mark(self, grad: ir.Value, where: tuple[int, int] | None) -> None:
        """Record that `grad` is one row (where = (sequence axis, rank)); None records nothing."""
        if where is not None:
            self._compact[grad] = where

    def widen(self, grad: ir.Value) -> ir.Value:
        if grad not in self._compact:
            return grad
        axis, rank_ = self._compact[grad]
        key = (axis, rank_)
        lead = 0 if self.stacked is None else 1
        if key not in self._masks:  # the [(K,) batch, seq] one-hot, with seq at `axis` of a rank-`rank_` tensor
            self._masks[key] = self.b.Unsqueeze(self._seq[3], self.b.i64([a + lead for a in range(1, rank_)
                                                                          if a != axis]))
        if lead:
            grad = self.apart(grad, axis, rank_)
        return self.b.Mul(grad, self._masks[key])

    def apart(self, rows: ir.Value, axis: int, rank_: int, grad: bool = True) -> ir.Value:
        """Under --targets, stacked rows with each target's row moved to its own K slice: a ĝ [1, batch, …, K, …]
        (a forward row [batch, …, K, …] when not `grad`; the K rows at `axis` of a rank-`rank_` tensor) →
        [K, batch, …, 1, …], a whole ĝ's layout with the row's sequence dim 1."""
        if not grad:
            rows = self.b.Unsqueeze(rows, self.b.i64([0]))
        perm = list(range(rank_ + 1))
        perm[0], perm[axis + 1] = axis + 1, 0
        return self.b.Transpose(rows, perm=perm)

    def row_dims(self, dims: list, axis: int) -> list:
        """The dims of a one-row ĝ of a tensor with forward dims `dims` (its sequence at `axis`)."""
        dims = list(dims)
        dims[axis] = 1 if self.stacked is None else self.stacked
        return dims if self.stacked is None else [1] + dims

    # ---- forward rows ----------------------------------------------------------------------------
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
            raise NotRowLocal
        a = axis - (rank_ - value.shape.rank())
        if a < 0 or value.shape[a] == 1:
            return None
        batch_ok = value.shape.rank() == rank_ and (value.shape[0] == 1 or same_dim(value.shape[0], self._seq[0]))
        if a >= 1 and batch_ok and same_dim(value.shape[a], self._seq[1]):
            return a
        raise NotRowLocal

    def readable(self, value: ir.Value | None, axis: int, rank_: int) -> bool:
        """Whether a rule on a one-row ĝ can read `value` (whole, or its row)."""
        try:
            self.row_axis(value, axis, rank_)
            return True
        except NotRowLocal:
            return False

    def row(self, value: ir.Value, axis: int = 1) -> ir.Value:
        """value[b, …, position[b], …] with the position at `axis`, kept as a dim of size 1."""
        key = (value, axis)
        if key not in self._rows:
            b = self.b
            index, flat = self._seq[2], self._seq[4]
            r, stacked = value.shape.rank(), self.stacked is not None
            if axis == 1 and same_dim(value.shape[0], self._seq[0]):
                row = b.GatherND(value, index, batch_dims=1)
                row = row if stacked else b.Unsqueeze(row, b.i64([1]))
            elif value.shape[0] == 1 and stacked:  # batch-broadcast data: [1, …, batch, K, …] → [batch, …, K, …]
                row = b.Squeeze(b.Gather(value, flat, axis=axis), b.i64([0]))
                if axis > 1:
                    row = b.Transpose(row, perm=[axis - 1] + list(range(axis - 1)) + list(range(axis, r)))
            elif value.shape[0] == 1:  # batch-broadcast data: the positions of all batch rows, moved to axis 0
                perm = list(range(r))
                perm[0], perm[axis] = axis, 0
                row = b.Transpose(b.Gather(value, flat, axis=axis), perm=perm)
            else:
                spread = b.Concat(b.i64([1]), *([b.Shape(value, start=1, end=axis)] if axis > 1 else []), b.i64([1]),
                                  *([b.Shape(value, start=axis + 1)] if axis + 1 < r else []), axis=0)
                at = (b.Unsqueeze(flat, b.i64([a for a in range(1, r) if a != axis])) if stacked
                      else b.Reshape(flat, b.i64([-1] + [1] * (r - 1))))
                row = b.GatherElements(value, b.Expand(at, spread), axis=axis)
            row.dtype = value.dtype  # known, so as_f32 adds no Cast to a float32 row
            dims = list(value.shape)
            dims[0], dims[axis] = self._seq[0], 1 if self.stacked is None else self.stacked
            row.shape = ir.Shape(dims)
            self._rows[key] = row
        return self._rows[key]

    # ---- which rules run on a row ----------------------------------------------------------------
    def plan(self, node: ir.Node, grads: list, form, params: dict) -> RowPlan | None:
        """How the node's rule maps a one-row ĝ (`form`: its row form, None if it has none): which inputs'
        ĝ stay one row (and along which axis), which forward inputs it reads as rows. None when the rule
        needs the whole ĝ (it is widened first)."""
        if form is None or len(node.outputs) != 1 or not grads or grads[0] not in self._compact:
            return None
        axis, rank_ = self._compact[grads[0]]
        out = node.outputs[0]
        if not self.is_seq(out, axis) or out.shape.rank() != rank_ or node.domain not in ("", "ai.onnx"):
            return None
        try:
            return form(Match(self, node, axis, rank_, params))
        except NotRowLocal:
            return None


class Match:
    """One attempt to run a node's rule on a one-row ĝ; a row form fills `plan` or returns None."""

    def __init__(self, rows: Rows, node: ir.Node, axis: int, rank_: int, params: dict):
        self.rows, self.node, self.axis, self.rank, self.params = rows, node, axis, rank_, params
        self.plan = RowPlan(axis, rank_)

    def carries(self, v) -> bool:
        return v is not None and v in self.rows.carrying

    def is_seq(self, v) -> bool:
        return self.rows.is_seq(v, self.axis)

    def same_row(self, v) -> None:
        """A carrying operand whose ĝ is one row along the same axis."""
        if not self.is_seq(v) or v.shape.rank() != self.rank:
            raise NotRowLocal
        self.plan.rows[v] = self.plan.grads[v] = self.axis

    def read(self, v) -> None:
        """A forward operand the rule may read: its row where it varies along the sequence."""
        a = self.rows.row_axis(v, self.axis, self.rank)
        if a is not None:
            self.plan.rows[v] = a


# ---- row forms -------------------------------------------------------------------------------------

def pointwise(m: Match) -> RowPlan | None:
    """Every carrying operand's ĝ is the same row; the other float operands are read as rows."""
    carried = False
    for v in m.node.inputs:
        if v is None:
            continue
        if m.carries(v):
            carried = True
            m.same_row(v)
        elif v.dtype in FLOAT_TYPES:
            m.read(v)
    return m.plan if carried else None


def matmul(m: Match) -> RowPlan | None:
    """ĝ·Wᵀ of a row is a row; a @ b with the sequence along a's rows: ĝ_a a row, ĝ_b = a_rowᵀ·ĝ whole."""
    a, w = m.node.inputs[:2]   # MatMulInteger's zero points after them
    if w.shape is not None and w.shape.rank() == 2 and not m.carries(w):
        if not (m.is_seq(a) and a.shape.rank() == m.rank and m.axis <= m.rank - 2):
            return None
        m.plan.rows[a] = m.plan.grads[a] = m.axis
        return m.plan
    if m.axis != m.rank - 2 or a.shape is None or a.shape.rank() != m.rank:
        return None
    m.same_row(a) if m.carries(a) else m.read(a)
    if m.carries(w):   # ĝ_b = a_rowᵀ·ĝ whole: under --targets one outer product per target (Context.apart)
        m.plan.grads[w] = None
    return m.plan


def product(m: Match) -> RowPlan | None:
    """A bilinear product's rule: the MatMul form for MatMul, else pointwise."""
    return matmul(m) if m.node.op_type == "MatMul" else pointwise(m)


def normalisation(m: Match) -> RowPlan | None:
    """Pointwise along the sequence when the normalised axes all lie after it."""
    return None if attr(m.node, "axis", -1) % m.rank <= m.axis else pointwise(m)


def softmax(m: Match) -> RowPlan | None:
    """Pointwise unless the softmax runs along the sequence."""
    return None if attr(m.node, "axis", -1) % m.rank == m.axis else pointwise(m)


def concat(m: Match) -> RowPlan | None:
    return None if attr(m.node, "axis") % m.rank == m.axis else pointwise(m)


def reshape(m: Match) -> RowPlan | None:
    """Rows stay rows while the dims up to the sequence are unchanged."""
    x, y = m.node.inputs[0], m.node.outputs[0]
    if x.shape is None or x.shape.rank() <= m.axis or \
            not all(same_dim(d, e) for d, e in zip(list(x.shape)[:m.axis + 1], list(y.shape)[:m.axis + 1])):
        return None
    m.plan.grads[x] = m.axis
    return m.plan


def transpose(m: Match) -> RowPlan | None:
    perm = attr(m.node, "perm")
    if perm is None or perm[0] != 0:
        return None
    m.plan.grads[m.node.inputs[0]] = perm[m.axis]
    return m.plan


def slice_(m: Match) -> RowPlan | None:
    """Slices along other axes, with bounds known at compile time (a constant Pad back)."""
    inputs = m.node.inputs
    axes = static_value(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    if axes is None or any(int(a) % m.rank == m.axis for a in axes) or any(
            static_value(v) is None for v in inputs[1:] if v is not None):
        return None
    m.same_row(inputs[0])
    return m.plan


def identity_region(m: Match) -> RowPlan | None:
    """The identity rule sends the region output's ĝ row to the region input u."""
    u = m.rows.values.get(m.params.get("input"))
    m.same_row(u)
    for v in m.node.inputs:
        if v is not None and v is not u:
            m.read(v)
    return m.plan
