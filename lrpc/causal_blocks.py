"""Causal self-attention in blocks: the forward rewrite that makes long contexts cheap.

A causal model's attention weights above the diagonal are exactly 0 (the mask is −inf or the dtype's
minimum there, whose exp underflows to 0), yet the exported graph computes all T² scores, and the
relevance pass would read and write all of them again four times. Cut the query rows into `blocks`
equal parts; block b (rows [s_b, e_b)) needs the keys [0, e_b) only:

    O[s_b:e_b] = softmax(chain(Q[s_b:e_b] @ Kᵀ[:, :e_b], M[s_b:e_b, :e_b])) @ V[:e_b]

which does (blocks + 1) / (2·blocks) of the work, and so does the relevance pass the walk derives from
it (Slice / Concat / MatMul / Softmax rows of the registry: nothing new in the reverse).

That equals the full attention only where every skipped score is masked away and every query row keeps
a key it may attend to: a left-padded row that attends to nothing gets a uniform average over *all*
keys in the full softmax. Whether that holds depends on the mask, known at run time, so the explainer
holds both the blocked and the plain graph and picks one per run (`guard`): the blocked one when every
mask is causal enough and the sequence is long enough to gain from it (lrpc/compiler.py)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from lrpc import contract
from lrpc.graph import Builder, attr, const_array, same_dim

BLOCKS = 8              # query blocks: (8 + 1)/16 = 56 % of the [T, T] work
MIN_TOKENS = 512        # shorter sequences run the plain graph (the per-block kernels cost more than they save)
MASKED = -1e30          # a skipped mask entry must be at most this (−inf, or the dtype's minimum −3.4e38) …
KEPT = -1e20            # … and every query row must keep an entry at least this, so exp(skipped − max) == 0
                        # for any score below 1e29 in size (not checked in the graph)

# elementwise steps between the score product and the softmax; their other inputs are scalars, but for the
# additive mask of the last step
_CHAIN = {"Mul", "Div", "Add", "Sub", "Tanh", "Cast", "Identity"}


@dataclass
class Attention:
    """One self-attention: scores = Q @ Kᵀ, `chain` to the softmax input, `softmax`, value-preserving
    steps `after` it, and `output` = weights @ V; `masks` are the chain's [.., T, T] inputs (sliced per block)."""
    scores: ir.Node
    chain: list[ir.Node]
    softmax: ir.Node
    after: list[ir.Node]
    output: ir.Node
    masks: list[ir.Value]


def find(graph: ir.Graph) -> list[Attention]:
    found = []
    for node in graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            attention = _match(node)
            if attention is not None:
                found.append(attention)
    return found


def _match(softmax: ir.Node) -> Attention | None:
    """The attention around `softmax`, or None when it is not a self-attention over equal query and key
    lengths whose every [T, T] step can be cut into row blocks."""
    y = softmax.outputs[0]
    rank = y.shape.rank() if y.shape is not None else None
    if rank is None or rank < 2 or attr(softmax, "axis", -1) % rank != rank - 1 or y.is_graph_output():
        return None
    rows, keys = y.shape[-2], y.shape[-1]
    if not same_dim(rows, keys):
        return None   # a cache or cross-attention: the diagonal is not the causal boundary
    after, weights = [], y   # value-preserving steps to the product (TorchScript exports add a Cast)
    while True:
        readers = [n for n, _ in weights.uses()]
        if len(readers) != 1 or weights.is_graph_output() or readers[0].op_type not in ("Cast", "Identity") \
                or readers[0].outputs[0].dtype != y.dtype:
            break
        after.append(readers[0])
        weights = readers[0].outputs[0]
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].inputs[0] is not weights:
        return None
    output = readers[0]
    if output.outputs[0].is_graph_output() or output.outputs[0].dtype != ir.DataType.FLOAT:
        return None   # (float16 masks are too shallow for the guard's margins: those models run the plain graph)
    chain, masks, value = [], [], softmax.inputs[0]
    while True:
        node = value.producer()
        if node is None or len(value.uses()) != 1 or value.is_graph_output():
            return None
        if node.op_type == "MatMul":
            break
        if node.op_type not in _CHAIN or node.domain not in ("", "ai.onnx"):
            return None
        along = [i for i in node.inputs if i is not None and _is_scores(i, rows)]
        if len(along) != 1:
            return None
        for side in node.inputs:
            if side is not None and side is not along[0] and not _is_scalar(side):
                # a mask only as the last step's addend: nothing after it may undo its −inf (a Tanh would)
                if chain or node.op_type != "Add" or side.shape is None or side.shape.rank() < 2 or not all(
                        d == 1 or same_dim(d, rows) for d in list(side.shape)[-2:]):
                    return None
                masks.append(side)
        chain.append(node)
        value = along[0]
    q, kt = node.inputs
    v = output.inputs[1]
    if not all(x is not None and x.shape is not None and x.shape.rank() >= 2 for x in (q, kt, v)) or not (
            same_dim(q.shape[-2], rows) and same_dim(kt.shape[-1], rows) and same_dim(v.shape[-2], rows)):
        return None
    return Attention(node, chain[::-1], softmax, after, output, masks)


def _is_scores(value: ir.Value, rows, depth: int = 8) -> bool:
    """Whether `value` is [.., T, T] and made from a product through chain steps (not a mask)."""
    node = value.producer()
    if node is None or depth == 0 or value.shape is None or value.shape.rank() < 2 or not (
            same_dim(value.shape[-2], rows) and same_dim(value.shape[-1], rows)):
        return False
    return node.op_type == "MatMul" or node.op_type in _CHAIN and any(
        i is not None and _is_scores(i, rows, depth - 1) for i in node.inputs)


def _is_scalar(value: ir.Value) -> bool:
    array = const_array(value)
    return array is not None and array.size == 1


def causal_masks(graph: ir.Graph, blocks: int = BLOCKS) -> list[str]:
    """The names of the masks the guard would check if `rewrite` cut `graph`'s attention into blocks; none
    when there is nothing to cut, a mask's cone does real work, or the masks fail the unpadded probe (the
    blocked graph would never run). Only reads the graph."""
    masks = mask_sources(_causal_attentions(graph))
    if not masks or causal_unpadded(graph, [m.name for m in masks], blocks) is False:
        return []
    return [m.name for m in masks]


def rewrite(graph: ir.Graph, blocks: int = BLOCKS) -> None:
    """Replace every causal-shaped self-attention of `graph` (one `causal_masks` accepts) by its row-block
    form. The new forward nodes are named after the ones they replace (plans and errors still point at
    them) and their outputs get shapes with one symbolic dim per block, so the relevance rules see the
    structure of the plain graph (softmax → its product)."""
    b = Builder(graph, prefix="causal_")
    cut = _Blocks(b, blocks)
    for a in _causal_attentions(graph):
        _rewrite_one(graph, cut, a)
    graph.sort()


def _causal_attentions(graph: ir.Graph) -> list[Attention]:
    return [a for a in find(graph) if any(_both(m) for m in a.masks)]


def _both(mask: ir.Value) -> bool:
    """A mask that varies along both the query and the key axis (a causal one can)."""
    return all(d != 1 for d in list(mask.shape)[-2:])


class _Blocks:
    """The row blocks of each sequence length: bounds computed once, mask slices shared by all layers."""

    def __init__(self, b: Builder, blocks: int):
        self.b, self.blocks = b, blocks
        self._bounds: dict[str, tuple] = {}
        self._masks: dict[tuple, ir.Value] = {}

    def bounds(self, q: ir.Value):
        """(row counts, key ends, row dims, key dims) of the blocks of q's rows (axis −2)."""
        b, dim = self.b, q.shape[-2]
        key = str(dim)
        if key not in self._bounds:
            length = b.Shape(q, start=-2, end=-1) if not isinstance(dim, int) else b.i64([dim])
            ends = [b.Div(b.Mul(length, b.i64([i + 1])), b.i64([self.blocks])) for i in range(self.blocks)]
            counts = [ends[0]] + [b.Sub(e, s) for s, e in zip(ends, ends[1:])]
            if isinstance(dim, int):
                row_dims = [dim * (i + 1) // self.blocks - dim * i // self.blocks for i in range(self.blocks)]
                key_dims = [dim * (i + 1) // self.blocks for i in range(self.blocks)]
            else:
                row_dims = [ir.SymbolicDim(f"{dim}_block{i}_rows") for i in range(self.blocks)]
                key_dims = [ir.SymbolicDim(f"{dim}_block{i}_keys") for i in range(self.blocks - 1)] + [dim]
            self._bounds[key] = (b.Concat(*counts, axis=0), ends, row_dims, key_dims)
        return self._bounds[key]

    def mask(self, mask: ir.Value, i: int, start, end, rows, keys) -> ir.Value:
        """Block i's part of a [.., T | 1, T | 1] mask (shared by every attention reading the same mask):
        its rows, and its keys but in the last block (all of them)."""
        if (mask, i) not in self._masks:
            b = self.b
            q_dim, k_dim = list(mask.shape)[-2:]
            cuts = ([(start, end, -2, rows)] if q_dim != 1 else []) + \
                   ([(b.i64([0]), end, -1, keys)] if k_dim != 1 and i < self.blocks - 1 else [])
            part = mask
            if cuts:
                begin, stop, axes, dims = zip(*cuts)
                part = _shaped(b.Slice(mask, b.Concat(*begin, axis=0), b.Concat(*stop, axis=0), b.i64(list(axes))),
                               mask, dict(zip(axes, dims)))
            self._masks[(mask, i)] = part
        return self._masks[(mask, i)]


def _shaped(value: ir.Value, like: ir.Value, dims: dict[int, object]) -> ir.Value:
    """value given like's type and shape with the axes in `dims` replaced."""
    shape = list(like.shape)
    for axis, d in dims.items():
        shape[axis] = d
    value.type, value.shape = like.type, ir.Shape(shape)
    return value


def _rewrite_one(graph: ir.Graph, cut: _Blocks, a: Attention) -> None:
    b = cut.b
    q, kt = a.scores.inputs
    v = a.output.inputs[1]
    counts, ends, row_dims, key_dims = cut.bounds(q)
    queries = b.Split(q, counts, axis=-2, _outputs=cut.blocks)   # disjoint rows: the reverse is one Concat
    zero = b.i64([0])
    outputs = []
    for i, end in enumerate(ends):
        start = zero if i == 0 else ends[i - 1]
        rows, keys = row_dims[i], key_dims[i]
        tag = f"_causal{i}"
        last = i == len(ends) - 1   # the last block reads all keys: no slices (and no padding in the reverse)
        keys_kt = kt if last else _shaped(b.Slice(kt, zero, end, b.i64([-1])), kt, {-1: keys})
        keys_v = v if last else _shaped(b.Slice(v, zero, end, b.i64([-2])), v, {-2: keys})
        x = _node(graph, a.scores, [_shaped(queries[i], q, {-2: rows}), keys_kt], tag, rows, keys)
        for node in a.chain:
            inputs = [inp if inp is None or _is_scalar(inp)
                      else cut.mask(inp, i, start, end, rows, keys) if inp in a.masks else x for inp in node.inputs]
            x = _node(graph, node, inputs, tag, rows, keys)
        for node in [a.softmax, *a.after]:
            x = _node(graph, node, [x], tag, rows, keys)
        outputs.append(_node(graph, a.output, [x, keys_v], tag, rows, None))
    joined = _shaped(b.Concat(*outputs, axis=-2), a.output.outputs[0], {})
    old = a.output.outputs[0]
    old.replace_all_uses_with(joined)
    for node in [a.output, *reversed(a.after), a.softmax, *reversed(a.chain), a.scores]:
        graph.remove(node, safe=True)


def _node(graph: ir.Graph, like: ir.Node, inputs, tag: str, rows, keys) -> ir.Value:
    """A copy of forward node `like` on new inputs, named after it, its output [.., rows, keys] (keys None:
    the last axis as like's)."""
    out = like.outputs[0]
    value = ir.Value(name=f"{out.name}{tag}")
    _shaped(value, out, {-2: rows} if keys is None else {-2: rows, -1: keys})
    graph.append(ir.Node(like.domain, like.op_type, inputs, attributes=list(like.attributes.values()),
                         outputs=[value], name=f"{like.name}{tag}"))
    return value


def mask_sources(attentions: list[Attention]) -> list[ir.Value]:
    """The [.., T, T] masks the guard must check; None when one is computed from more than the model's
    inputs' shapes and masks (a product in its cone: the guard would repeat real work)."""
    masks, seen, stack = [], set(), []
    for a in attentions:
        for m in a.masks:
            if _both(m) and m not in seen:
                seen.add(m)
                masks.append(m)
                stack.append(m)
    visited = set()
    while stack:
        node = stack.pop().producer()
        if node is None or node in visited:
            continue
        visited.add(node)
        if node.op_type in _HEAVY or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                         for a in node.attributes.values()):
            return None
        stack.extend(i for i in node.inputs if i is not None)
    return masks


_HEAVY = {"MatMul", "Gemm", "Conv", "Einsum", "Softmax", "LayerNormalization"}


def guarded(plain: ir.Model, blocked: ir.Model, masks: list[str], blocks: int, min_tokens: int) -> ir.Model:
    """One explainer holding both: If(guard, blocked, plain). The guard (computed from the masks, copied
    from the plain graph) says whether every mask hides all the scores the blocks skip, every query row
    keeps a key, and the sequence has at least `min_tokens` tokens."""
    main = ir.Graph([], [], nodes=[], name=plain.graph.name, opset_imports=dict(plain.graph.opset_imports))
    weights = [plain.graph.initializers.pop(name) for name in list(plain.graph.initializers)]
    inputs = list(plain.graph.inputs)   # (an optional input is also an initializer: its default)
    plain.graph.inputs.clear()
    main.inputs.extend(inputs)
    for value in weights:
        main.register_initializer(value)
    for value in blocked.graph.inputs:   # the same inputs, read from the outer graph
        value.replace_all_uses_with(main.inputs[[v.name for v in main.inputs].index(value.name)])
    blocked.graph.inputs.clear()
    for name in list(blocked.graph.initializers):
        value = blocked.graph.initializers[name]
        twin = main.initializers.get(name)
        if twin is not None and _same_tensor(twin, value):
            blocked.graph.initializers.pop(name)
            value.replace_all_uses_with(twin)
        elif twin is not None:
            value.name = value.const_value.name = f"{name}.blocked"
    b = Builder(main, prefix="lrp_causal_guard_")
    cond = _guard(b, plain.graph, masks, blocks, min_tokens)
    outputs = []
    for graph, tag in ((blocked.graph, "blocked"), (plain.graph, "plain")):
        for i, value in enumerate(graph.outputs):
            if value.producer() is None or value.producer().graph is not graph:   # an outer value: copy it in
                copy = ir.Value(name=f"{value.name}.{tag}", type=value.type, shape=value.shape)
                graph.append(ir.Node("", "Identity", [value], outputs=[copy]))
                graph.outputs[i] = copy
            else:
                value.name = f"{value.name}.{tag}"
    for value in plain.graph.outputs:
        outputs.append(ir.Value(name=value.name[:-len(".plain")], type=value.type, shape=value.shape))
    node = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", blocked.graph),
                                                  ir.AttrGraph("else_branch", plain.graph)],
                   outputs=outputs, name="lrp_causal_blocks")
    main.append(node)
    main.outputs.extend(outputs)
    model = ir.Model(main, ir_version=plain.ir_version, producer_name=plain.producer_name,
                     producer_version=plain.producer_version, doc_string=plain.doc_string)
    model.metadata_props.update(plain.metadata_props)
    info = contract.read_metadata(model.metadata_props)
    contract.write_metadata(model, {**info, "causal_blocks": {"blocks": blocks, "min_tokens": min_tokens}})
    return model


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    x, y = a.const_value, b.const_value
    if x is None or y is None or x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
        return False
    if isinstance(x, ir.ExternalTensor) and isinstance(y, ir.ExternalTensor):
        return (x.location, x.offset, x.length) == (y.location, y.offset, y.length)
    import numpy as np
    return np.array_equal(x.numpy(), y.numpy())


def _guard(b: Builder, source: ir.Graph, masks: list[str], blocks: int, min_tokens: int) -> ir.Value:
    """A bool scalar: the blocked graph equals the plain one on these inputs (module docstring)."""
    copies = _copy_cone(b, source, masks)
    inf = b.f32(float("inf"))
    ok = None
    for name in masks:
        mask = copies[name]
        length = b.Shape(mask, start=-1)
        ends = b.Concat(*[b.Div(b.Mul(length, b.i64([i + 1])), b.i64([blocks])) for i in range(blocks)], axis=0)
        rows = b.Range(b.i64(0), b.Squeeze(length, b.i64([0])), b.i64(1))
        # the end of each row's block: the first block end beyond the row
        row_end = b.ReduceMin(b.Where(b.Greater(b.Unsqueeze(ends, b.i64([0])), b.Unsqueeze(rows, b.i64([1]))),
                                      b.Unsqueeze(ends, b.i64([0])), b.Unsqueeze(length, b.i64([0]))),
                              b.i64([1]), keepdims=0)
        skipped = b.GreaterOrEqual(b.Unsqueeze(rows, b.i64([0])), b.Unsqueeze(row_end, b.i64([1])))
        values = b.Cast(mask, to=ir.DataType.FLOAT.value)
        hidden = b.LessOrEqual(b.ReduceMax(b.Where(skipped, values, b.Neg(inf)), keepdims=0), b.f32(MASKED))
        kept = b.GreaterOrEqual(b.ReduceMin(b.ReduceMax(b.Where(skipped, b.Neg(inf), values), b.i64([-1]),
                                                        keepdims=0), keepdims=0), b.f32(KEPT))
        both = b.And(hidden, kept)
        long_enough = b.GreaterOrEqual(b.Squeeze(length, b.i64([0])), b.i64(min_tokens))
        ok = b.And(both, long_enough) if ok is None else b.And(ok, b.And(both, long_enough))
    return ok


def _copy_cone(b: Builder, source: ir.Graph, names: list[str]) -> dict[str, ir.Value]:
    """Copies, in b's graph, of the nodes of `source` that compute the named values. What they read from
    outside `source` is looked up by name among b's graph's inputs and initializers (a constant missing
    there is added to it)."""
    outer = {v.name: v for v in [*b.graph.inputs, *b.graph.initializers.values()]}
    by_name = dict(outer)
    by_name.update((v.name, v) for node in source for v in node.outputs)
    copies: dict[ir.Value, ir.Value] = {}

    def copy(value: ir.Value) -> ir.Value:
        node = value.producer()
        if node is None or node.graph is not source:
            if value.name not in outer and value.const_value is not None:
                outer[value.name] = ir.Value(name=value.name, type=value.type, shape=value.shape,
                                             const_value=value.const_value)
                b.graph.register_initializer(outer[value.name])
            return outer.get(value.name, value)
        if value not in copies:
            inputs = [None if i is None else copy(i) for i in node.inputs]
            outs = [ir.Value(name=b.fresh(o.name or "v"), type=o.type, shape=o.shape) for o in node.outputs]
            b.graph.append(ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                                   outputs=outs, name=b.fresh(node.name or node.op_type)))
            copies.update(zip(node.outputs, outs))
        return copies[value]
    return {name: copy(by_name[name]) for name in names}


PROBE_TOKENS = 16


def causal_unpadded(graph: ir.Graph, masks: list[str], blocks: int) -> bool | None:
    """Whether the guard holds for one unpadded sequence of PROBE_TOKENS tokens (integer inputs all ones,
    position ids 0 … T−1, inputs read only for their shape ones): if not — a bidirectional encoder's expanded padding mask — the blocked graph would
    never run, and is not built. None when that cannot be tried (a float mask input: the caller's)."""
    import numpy as np
    import onnxruntime as ort
    inputs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in graph.inputs]
    probe = ir.Graph(inputs, [], nodes=[], name="lrpc_causal_probe", opset_imports=dict(graph.opset_imports))
    b = Builder(probe, prefix="probe_")
    ok = _guard(b, graph, masks, blocks, 1)
    probe.outputs.append(ok)
    ok.type, ok.shape = ir.TensorType(ir.DataType.BOOL), ir.Shape([])
    feed = {}
    for v in probe.inputs:
        readers = [node for node, _ in v.uses()]
        if not readers:
            continue
        shape_only = all(node.op_type == "Shape" for node in readers)   # (ViT's zero mask: pixel_values' shape)
        if v.shape is None or not shape_only and v.dtype not in (ir.DataType.INT64, ir.DataType.INT32,
                                                                  ir.DataType.BOOL):
            return None   # a float mask given as an input: its values are the caller's
        shape = [d if isinstance(d, int) else 1 if axis == 0 else PROBE_TOKENS for axis, d in enumerate(v.shape)]
        array = np.broadcast_to(np.arange(shape[-1]), shape) if "position" in v.name and shape else np.ones(shape)
        feed[v.name] = array.astype(v.dtype.numpy())
    probe.inputs[:] = [v for v in probe.inputs if v.name in feed]
    try:
        session = ort.InferenceSession(ir.to_proto(ir.Model(probe, ir_version=10)).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return bool(session.run(None, feed)[0])
    except Exception:   # noqa: BLE001 — a probe that cannot run decides nothing; the run-time guard still does
        return None
