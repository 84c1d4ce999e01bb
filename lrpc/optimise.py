"""Optimise the emitted explainer: dead code, common subexpressions, and two peepholes on the relevance
graph that onnxruntime's own optimisers do not make.

The reverse pass of a transformer is mostly ĝ·Wᵀ products, emitted as `Reshape(Gemm(Reshape(ĝ), W, transB=1))`
(vjp_linear.matmul_weight_grad). Around them sit two cheap-looking ops that each cost a pass over a
[tokens, hidden] tensor and a kernel launch:

- `scale_into_gemm`:  c · Reshape(Gemm(A, W, α))            →  Reshape(Gemm(A, W, α·c))
  (the ½ of the uniform rule, a norm's constant factor);
- `accumulate_in_gemm`:  Σ_k Reshape(Gemm(A_k, W_k)) + rest  →  Reshape(Gemm(A_n, W_n, C = … Gemm(A_1, W_1)))
  (ĝ of a tensor read by several projections, e.g. q/k/v or gate/up: Gemm's C input sums for free).

- `pads_to_concat`:  Pad(b, after=D−k) + Pad(a, before=k) + rest  →  Concat(b, a) + rest
  (ĝ of two complementary slices, as in rotary embeddings' rotate_half: one write instead of two padded
  copies and a three-way sum).
- `rotary_swap`:  Concat(a₂, −a₁) + ĝ·c, a = ĝ·s  →  swap(ĝ·ŝ) + ĝ·c, ŝ = Concat(−s₁, s₂)
  (rotate_halfᵀ(ĝ·sin) + ĝ·cos, the reverse of a rotary embedding; ₁ ₂ the halves of the last axis): the sign
  goes into the forward's sin once, and the halves are exchanged by one strided copy (a Slice with step −1
  over a [.., 2, D/2] view) instead of a Split, a Neg and a Concat of the K-wide ĝ. Bit for bit the same.

With a K axis (`--targets`) one more, since there ĝ is K times the size of the forward values it meets:

- `factors_once`:  (ĝ · a) · c  →  ĝ · (a · c)  for forward values a, c
  (a norm's weight and 1/σ, a gated MLP's other branch and σ(x)): the factor is made once at the forward's
  size, and ĝ is multiplied once instead of twice.
- `stacked_pair`:  Gemm(ĝ·b, W_b, C = Gemm(ĝ·a, W_a))  →  Gemm([ĝ·a, ĝ·b], [W_a; W_b])  for forward values a, b
  (a gated MLP's ĝ into gate and up): one broadcast product reads ĝ once and writes both factors side by
  side, and one Gemm over the stacked weights (a constant onnxruntime folds) replaces two and the copy of C.

Each applies only to relevance nodes (named `lrp_…`): the forward graph stays exactly as exported, so the
explainer's outputs equal the model's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lrpc.graph import PREFIX, Builder, attr, const_array, rank, same_dim, static_dims, static_value


def optimise(model: ir.Model, seeds: tuple[str, ...] = ()) -> None:
    """seeds: with a K axis, the names of the graph inputs ĝ is made from (`factors_once`)."""
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    graph = model.graph
    b = Builder(graph)
    scale_into_gemm(graph)
    accumulate_in_gemm(graph, b)
    pads_to_concat(graph, b)
    rotary_swap(graph, b)
    if seeds:
        grads = _computed_from([v for v in graph.inputs if v.name in seeds])
        factors_once(graph, b, grads)
        stacked_pair(graph, b, grads)
    graph.sort()
    common_passes.RemoveUnusedNodesPass()(model)


def _ours(node: ir.Node | None) -> bool:
    return node is not None and node.name.startswith(PREFIX) and node.domain in ("", "ai.onnx")


def _only_consumer(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


def _reshaped_gemm(value: ir.Value, consumer: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(Reshape, Gemm) when `value` = Reshape(Gemm(A, B)) is read by `consumer` alone, the Gemm by the Reshape
    alone, and the Gemm has no C yet."""
    reshape = value.producer()
    if not _ours(reshape) or reshape.op_type != "Reshape" or not _only_consumer(value, consumer):
        return None
    gemm = reshape.inputs[0].producer()
    if not _ours(gemm) or gemm.op_type != "Gemm" or len(gemm.inputs) > 2 \
            or not _only_consumer(reshape.inputs[0], reshape):
        return None
    return reshape, gemm


def _gemm_columns(gemm: ir.Node) -> int | None:
    """N of Gemm(A, B) = A'·B' when B is a rank-2 tensor of known shape."""
    w = gemm.inputs[1]
    if w.shape is None or w.shape.rank() != 2:
        return None
    n = w.shape[0] if attr(gemm, "transB", 0) else w.shape[1]
    return n if isinstance(n, int) else None


def _scalar(value: ir.Value | None) -> float | None:
    if value is not None and value.is_graph_input():   # an overridable initializer is no constant
        return None
    array = const_array(value)
    if array is None or array.size != 1 or array.dtype != np.float32:
        return None
    return float(array.reshape(()))


def scale_into_gemm(graph: ir.Graph) -> int:
    """c · Reshape(Gemm(A, W, α)) → Reshape(Gemm(A, W, α·c)) for a float32 scalar constant c."""
    done = 0
    for node in list(graph):
        if not _ours(node) or node.op_type != "Mul" or node.outputs[0].is_graph_output():
            continue
        for i in (0, 1):
            c = _scalar(node.inputs[1 - i])
            found = _reshaped_gemm(node.inputs[i], node) if c is not None else None
            if found is None:
                continue
            reshape, gemm = found
            alpha = attr(gemm, "alpha", 1.0)
            gemm.attributes["alpha"] = ir.AttrFloat32("alpha", float(np.float32(alpha) * np.float32(c)))
            node.outputs[0].replace_all_uses_with(reshape.outputs[0])
            graph.remove(node, safe=True)
            done += 1
            break
    return done


def accumulate_in_gemm(graph: ir.Graph, b: Builder) -> int:
    """Σ Reshape(Gemm(A_k, W_k)) → one Reshape of chained Gemms, each adding the previous one as its C.
    The parts must share their Reshape's shape input and their Gemm's (static) column count: the same
    [M, N] for every Gemm."""
    done = 0
    for node in list(graph):
        if not _ours(node) or node.op_type != "Sum" or len(node.inputs) < 2 or node.outputs[0].is_graph_output():
            continue
        groups: dict[tuple, list[tuple[ir.Node, ir.Node]]] = {}
        for value in node.inputs:
            found = _reshaped_gemm(value, node) if value is not None and list(node.inputs).count(value) == 1 else None
            cols = _gemm_columns(found[1]) if found is not None else None
            if cols is not None:
                groups.setdefault((found[0].inputs[1], cols), []).append(found)
        parts = max(groups.values(), key=len, default=[])
        if len(parts) < 2:
            continue
        for (_, previous), (_, gemm) in zip(parts, parts[1:]):
            gemm.resize_inputs(3)
            gemm.replace_input_with(2, previous.outputs[0])
            gemm.attributes.pop("beta", None)
        _replace_sum(graph, b, node, parts[-1][0].outputs[0], [r.outputs[0] for r, _ in parts])
        graph.remove([reshape for reshape, _ in parts[:-1]], safe=True)
        done += 1
    return done


def _replace_sum(graph: ir.Graph, b: Builder, node: ir.Node, combined: ir.Value, used: list[ir.Value]) -> None:
    """Sum(used…, rest…) → Sum(combined, rest…) (or combined alone), where `combined` sums the `used` inputs."""
    rest = [v for v in node.inputs if v not in used]
    node.outputs[0].replace_all_uses_with(b.Sum(combined, *rest) if rest else combined)
    graph.remove(node, safe=True)


def _one_axis_pad(value: ir.Value, consumer: ir.Node) -> tuple[int, int, int, int] | None:
    """(axis, before, after, padded dim) of value = Pad(x, constant pads along one axis, zeros), read by
    `consumer` alone, with its output's dim along that axis known."""
    pad = value.producer()
    if not _ours(pad) or pad.op_type != "Pad" or attr(pad, "mode", "constant") != "constant" \
            or len(pad.inputs) > 2 or not _only_consumer(value, consumer) or value.shape is None:
        return None
    pads = const_array(pad.inputs[1])
    r = value.shape.rank()
    if pads is None or pads.size != 2 * r:
        return None
    axes = [i for i in range(r) if pads[i] or pads[r + i]]
    if len(axes) != 1 or not isinstance(value.shape[axes[0]], int):
        return None
    axis = axes[0]
    return axis, int(pads[axis]), int(pads[r + axis]), value.shape[axis]


def pads_to_concat(graph: ir.Graph, b: Builder) -> int:
    """Sum(…, Pad(b, after = D − k), Pad(a, before = k), …) → Sum(…, Concat(b, a), …): the two pads cover
    complementary ranges of one axis of length D."""
    done = 0
    for node in list(graph):
        if not _ours(node) or node.op_type != "Sum" or len(node.inputs) < 2 or node.outputs[0].is_graph_output():
            continue
        pads = {v: _one_axis_pad(v, node) for v in node.inputs if v is not None and list(node.inputs).count(v) == 1}
        pair = next(((head, tail) for head, h in pads.items() for tail, t in pads.items()
                     if h is not None and t is not None and head is not tail and h[0] == t[0] and h[3] == t[3]
                     and h[1] == 0 and t[2] == 0 and t[1] == h[3] - h[2]), None)
        if pair is None:
            continue
        head, tail = pair   # (the axis counted from the end, as rotary_swap reads it)
        joined = b.Concat(head.producer().inputs[0], tail.producer().inputs[0],
                          axis=pads[head][0] - head.shape.rank())
        _replace_sum(graph, b, node, joined, [head, tail])
        graph.remove([head.producer(), tail.producer()], safe=True)
        done += 1
    return done


def _last_axis(axis: int, value: ir.Value) -> bool:
    """`axis` names the last axis of `value` (−1, or rank − 1 where the rank is known)."""
    r = rank(value)
    return axis == -1 or (r is not None and axis == r - 1)


def _last_axis_half(value: ir.Value) -> tuple[ir.Node, int, int] | None:
    """(Split, which half, half width) when `value` is output 0 or 1 of a Split of its input's last axis
    into two halves of one static width."""
    split = value.producer()
    if not _ours(split) or split.op_type != "Split" or len(split.outputs) != 2 or len(split.inputs) != 2:
        return None
    sizes = static_value(split.inputs[1])
    if sizes is None or sizes.tolist() != [sizes[0]] * 2 or not _last_axis(attr(split, "axis", 0), split.inputs[0]):
        return None
    return split, list(split.outputs).index(value), int(sizes[0])


def _swapped_halves(value: ir.Value, consumer: ir.Node) -> tuple[ir.Node, int] | None:
    """(Split, half width) when `value` = Concat(a₂, Neg(a₁)) along the last axis, read by `consumer` alone,
    with a₁, a₂ the halves of a Split read by that Concat and Neg alone."""
    cat = value.producer()
    if not _ours(cat) or cat.op_type != "Concat" or len(cat.inputs) != 2 or not _only_consumer(value, consumer):
        return None
    second, negated = cat.inputs
    neg = negated.producer()
    if not _ours(neg) or neg.op_type != "Neg" or not _only_consumer(negated, cat):
        return None
    h2, h1 = _last_axis_half(second), _last_axis_half(neg.inputs[0])
    if h1 is None or h2 is None or h1[0] is not h2[0] or (h1[1], h2[1]) != (0, 1) \
            or not _only_consumer(second, cat) or not _only_consumer(neg.inputs[0], neg):
        return None
    if not _last_axis(attr(cat, "axis"), h1[0].inputs[0]):
        return None
    return h1[0], h1[2]


def rotary_swap(graph: ir.Graph, b: Builder) -> int:
    """Sum(Concat(a₂, −a₁), Mul(ĝ, c)), a = Mul(ĝ, s) split in halves of width d along the last axis
    → Add(swap(Mul(ĝ, ŝ)), Mul(ĝ, c)) with ŝ = Concat(−s₁, s₂) made once per s, where s's last axis is 2d wide."""
    signed: dict[ir.Value, ir.Value] = {}
    done = 0
    for node in list(graph):
        if not _ours(node) or node.op_type != "Sum" or len(node.inputs) < 2 or node.outputs[0].is_graph_output():
            continue
        for rotated in node.inputs:
            found = _swapped_halves(rotated, node) if list(node.inputs).count(rotated) == 1 else None
            product = found[0].inputs[0].producer() if found is not None else None
            if not _ours(product) or product.op_type != "Mul" or not _only_consumer(product.outputs[0], found[0]):
                continue
            split, d = found
            for i in (0, 1):   # a = ĝ·s; the other addend is ĝ·c
                g, s = product.inputs[i], product.inputs[1 - i]
                cosine = next((v for v in node.inputs if v is not rotated and list(node.inputs).count(v) == 1
                               and _ours(v.producer()) and v.producer().op_type == "Mul"
                               and g in v.producer().inputs and s not in v.producer().inputs), None)
                if cosine is not None and static_dims(s, -1) == [2 * d]:
                    break
            else:
                continue
            if s not in signed:
                first, second = b.Split(s, split.inputs[1], axis=-1, _outputs=2)
                signed[s] = b.Concat(b.Neg(first), second, axis=-1)
            product.replace_input_with(1 - i, signed[s])
            halves = b.Reshape(product.outputs[0], b.i64([-1, 2, d]))
            swapped = b.Slice(halves, b.i64([-1]), b.i64([np.iinfo(np.int64).min]), b.i64([1]), b.i64([-1]))
            combined = b.Add(b.Reshape(swapped, b.Shape(product.outputs[0])), cosine)
            neg = rotated.producer().inputs[1].producer()
            _replace_sum(graph, b, node, combined, [rotated, cosine])
            graph.remove([rotated.producer(), neg, split], safe=True)
            done += 1
            break
    return done


def _computed_from(sources: list[ir.Value]) -> set[ir.Value]:
    """Every value computed from `sources` (and they themselves)."""
    found, stack = set(sources), list(sources)
    while stack:
        for node, _ in stack.pop().uses():
            for out in node.outputs:
                if out not in found:
                    found.add(out)
                    stack.append(out)
    return found


def factors_once(graph: ir.Graph, b: Builder, grads: set[ir.Value]) -> int:
    """Mul(Mul(ĝ, a), c) → Mul(ĝ, Mul(a, c)) where ĝ is computed from the seed inputs (is in `grads`) and a, c
    are not, and the inner product is read by the outer one alone. A chain ĝ·a·c·d folds in turn (nodes in
    order)."""
    done = 0
    for node in list(graph):
        if not _ours(node) or node.op_type != "Mul" or node.outputs[0].is_graph_output():
            continue
        for i in (0, 1):
            inner, c = node.inputs[i].producer(), node.inputs[1 - i]
            if c in grads or not _ours(inner) or inner.op_type != "Mul" \
                    or not _only_consumer(node.inputs[i], node):
                continue
            carried = [j for j in (0, 1) if inner.inputs[j] in grads]
            if len(carried) != 1:
                continue
            g, a = inner.inputs[carried[0]], inner.inputs[1 - carried[0]]
            node.replace_input_with(i, g)
            node.replace_input_with(1 - i, b.Mul(a, c))
            graph.remove(inner, safe=True)
            done += 1
            break
    return done


def _scaled_rows(gemm: ir.Node, grads: set[ir.Value]) -> tuple[ir.Value, ir.Value, ir.Node, ir.Node] | None:
    """(ĝ, a, Reshape, Mul) when the Gemm's A = Reshape(Mul(ĝ, a)), each read by the next alone, with ĝ in
    `grads` and a not."""
    reshape = gemm.inputs[0].producer()
    if not _ours(reshape) or reshape.op_type != "Reshape" or not _only_consumer(gemm.inputs[0], gemm):
        return None
    mul = reshape.inputs[0].producer()
    if not _ours(mul) or mul.op_type != "Mul" or not _only_consumer(reshape.inputs[0], reshape):
        return None
    carried = [i for i in (0, 1) if mul.inputs[i] in grads]
    if len(carried) != 1 or mul.inputs[1 - carried[0]] in grads:
        return None
    return mul.inputs[carried[0]], mul.inputs[1 - carried[0]], reshape, mul


def _dims(value: ir.Value) -> list | None:
    """value's dims, or those of a product of two values of one known shape (a factor factors_once made)."""
    if value.shape is not None:
        return list(value.shape)
    mul = value.producer()
    if mul is None or mul.op_type != "Mul" or any(v.shape is None for v in mul.inputs):
        return None
    x, y = (list(v.shape) for v in mul.inputs)
    return x if len(x) == len(y) and all(same_dim(p, q) for p, q in zip(x, y)) else None


def stacked_pair(graph: ir.Graph, b: Builder, grads: set[ir.Value]) -> int:
    """Gemm(Reshape(ĝ·b, [-1, N]), W_b, C = Gemm(Reshape(ĝ·a, [-1, N]), W_a)), both Gemms alike (α, transB, no
    transA) with weights of one static shape and a, b of one shape → Gemm(Reshape(ĝ[.., None, :]·[a; b],
    [-1, 2N]), Concat(W_a, W_b)) (stacked along the contracted axis)."""
    done = 0
    for outer in list(graph):
        if not _ours(outer) or outer.op_type != "Gemm" or len(outer.inputs) != 3:
            continue
        inner = outer.inputs[2].producer()
        if not _ours(inner) or inner.op_type != "Gemm" or len(inner.inputs) != 2 \
                or not _only_consumer(outer.inputs[2], outer) \
                or any(attr(g, "transA", 0) for g in (inner, outer)) \
                or attr(inner, "transB", 0) != attr(outer, "transB", 0) \
                or attr(inner, "alpha", 1.0) != attr(outer, "alpha", 1.0) or attr(outer, "beta", 1.0) != 1.0:
            continue
        first, second = _scaled_rows(inner, grads), _scaled_rows(outer, grads)
        if first is None or second is None or first[0] is not second[0] or first[2].inputs[1] is not second[2].inputs[1]:
            continue
        g, a, b_ = first[0], first[1], second[1]
        shape, w_a, w_b = static_value(first[2].inputs[1]), static_dims(inner.inputs[1]), static_dims(outer.inputs[1])
        n = w_a[1 if attr(outer, "transB", 0) else 0] if w_a is not None and len(w_a) == 2 else None
        dims_a, dims_b = _dims(a), _dims(b_)
        if shape is None or shape.tolist() != [-1, n] or w_a != w_b or dims_a is None or dims_b is None \
                or len(dims_a) != len(dims_b) or not all(same_dim(x, y) for x, y in zip(dims_a, dims_b)):
            continue
        stacked = b.Concat(b.Unsqueeze(a, b.i64([-2])), b.Unsqueeze(b_, b.i64([-2])), axis=-2)
        rows = b.Reshape(b.Mul(b.Unsqueeze(g, b.i64([-2])), stacked), b.i64([-1, 2 * n]))
        weights = b.Concat(inner.inputs[1], outer.inputs[1], axis=1 if attr(outer, "transB", 0) else 0)
        outer.resize_inputs(2)
        outer.replace_input_with(0, rows)
        outer.replace_input_with(1, weights)
        graph.remove([inner, first[2], first[3], second[2], second[3]], safe=True)
        done += 1
    return done
