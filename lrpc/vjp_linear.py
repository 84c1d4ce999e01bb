"""VJPs of the linear contractions: MatMul, Gemm, Conv, Einsum, and of Range, linear in its start and delta
(docs/design.md, "Relevance semantics")."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrpc import vjp_conv as conv_family
from lrpc.errors import LrpcError
from lrpc.graph import attr as node_attr, same_dim, static_value


def _swap_last(n, v, r, grad=False):
    """v with its last two axes swapped (v of rank r; a ĝ when `grad`, with ĝ's own leading axes)."""
    perm = list(range(r - 2)) + [r - 1, r - 2]
    return n.b.Transpose(v, perm=n.grad_perm(perm) if grad else perm)


def matmul(n, g):
    """y = a @ b (numpy matmul semantics, rank-1 operands promoted). Each thunk needs only the rank of
    the operand it transposes, so a weight of known rank suffices when the activation's rank is unknown."""
    b = n.b
    ra, rb = n.rank(0), n.rank(1)

    def known(r, i):
        if r is None:
            raise LrpcError(f"node '{n.node.name}' (MatMul): rank of operand {i} unknown after shape inference; "
                            "re-export the model with static ranks")
        return r
    if rb == 1:   # y[..., m] = a[..., m, k] · b[k]
        return (lambda: b.Mul(b.Unsqueeze(g, b.i64([-1])), n.x(1)),
                lambda: b.ReduceSum(b.Mul(n.x(0), b.Unsqueeze(g, b.i64([-1]))),
                                    b.i64([n.grad_axis(i) for i in range(known(ra, 0) - 1)]), keepdims=0)
                if ra != 1 else b.Mul(n.x(0), g))
    if ra == 1:   # y[..., n] = a[k] · b[..., k, n]
        return (lambda: b.ReduceSum(b.Mul(b.Unsqueeze(g, b.i64([-2])), n.x(1)),
                                    b.i64([n.grad_axis(i) for i in list(range(known(rb, 1) - 2)) + [rb - 1]]),
                                    keepdims=0),
                lambda: b.Mul(b.Unsqueeze(n.x(0), b.i64([-1])), b.Unsqueeze(g, b.i64([-2]))))
    if rb == 2 and ra is not None and ra >= 2 and not n.carries(1):
        return (lambda: matmul_weight_grad(n, g), None)
    # only the batch dims (all but the last two) can have been broadcast. ĝ_b from a one-row ĝ
    # (lrpc.rows.matmul) is a_rowᵀ·ĝ_row; under --targets each target's own (n.apart: K rows into the K axis)
    row_a = lambda: n.apart(n.x(0), 0)  # noqa: E731
    grad_a = lambda: n.unbroadcast(b.MatMul(g, _swap_last(n, n.x(1), known(rb, 1))), 0, core=2)  # noqa: E731
    shared = _shared_heads(n) if n.carries(1) else None
    if shared is not None:   # grouped-query attention: ĝ of the shared keys / values, summed over each group
        kv, groups, swapped = shared

        def fold(v, lead):   # [lead…, B, G·r, rows, ·] → [lead…, B, G, r·rows, ·]
            return b.Reshape(v, b.i64([0] * (lead + 1) + [groups, -1, 0]))

        def fold_grad():   # ĝ·c (the uniform rule's ½) folded as fold(ĝ)·c: c stays next to the product,
            scaled = g.producer()   # where onnxruntime fuses it in
            c = static_value(scaled.inputs[1]) if scaled is not None and scaled.op_type == "Mul" else None
            if c is not None and c.size == 1 and not n.stacked:
                return b.Mul(fold(scaled.inputs[0], n.lead), scaled.inputs[1])
            return fold(n.apart(g), n.lead)
        a_lead = 1 if n.stacked else 0   # n.apart gives a forward row a K axis
        if swapped:   # b = kᵀ: ĝ_k = Σ_h ĝ_hᵀ·a_h over the group's heads h, one product over [h·rows]
            def grad_kv():
                return b.MatMul(_swap_last(n, fold_grad(), 4, grad=True), fold(row_a(), a_lead))
        else:         # b = v: ĝ_v = Σ_h a_hᵀ·ĝ_h
            def grad_kv():
                return b.MatMul(_swap_last(n, fold(row_a(), a_lead), 4, grad=n.stacked), fold_grad())
        return {n.raw(0): grad_a, kv: grad_kv}
    if _is_swap_of_full_batch(n, 1):  # b = kᵀ (attention scores q·kᵀ): ĝ_k = ĝᵀ·a directly, as (ĝᵀ·a)ᵀᵀ
        grad_b = lambda: _swap_last(  # noqa: E731
            n, b.MatMul(_swap_last(n, n.apart(g), rb, grad=True), row_a()), rb, grad=True)
    else:
        grad_b = lambda: n.unbroadcast(  # noqa: E731
            b.MatMul(_swap_last(n, row_a(), known(ra, 0), grad=n.stacked), n.apart(g)), 1, core=2)
    return (grad_a, grad_b)


def _shared_heads(n):
    """(kv, G, swapped) when MatMul operand b is kv [B, G, T, D] with each of its G heads repeated r times
    along the head axis — grouped-query attention's Unsqueeze(axis 2) → Expand → Reshape, in both exporters —
    perhaps with its last two axes then swapped (b = kᵀ), operand a [B, G·r, rows, ·], and each step between
    only handing ĝ on. Then Σ_h a_hᵀ·ĝ_h over a group's heads h is one product: a and ĝ [.., G·r, rows, ·]
    read as [.., G, r·rows, ·] (a free Reshape), instead of a product per head, a Reshape and a ReduceSum."""
    v, swapped = n.raw(1), False
    node = v.producer()
    if node is not None and node.op_type == "Transpose" and list(node_attr(node, "perm") or []) == [0, 1, 3, 2]:
        v, swapped = node.inputs[0], True
        node = v.producer()
    expand = node.inputs[0].producer() if node is not None and node.op_type == "Reshape" else None
    unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or n.rank(0) != 4:
        return None
    kv, axes = unsqueeze.inputs[0], static_value(unsqueeze.inputs[1])
    steps = [n.raw(1), v, expand.outputs[0], unsqueeze.outputs[0]][0 if swapped else 1:]
    shapes = [x.shape for x in (kv, expand.outputs[0], v, n.raw(0))]
    if axes is None or [int(a) % 5 for a in np.ravel(axes)] != [2] or any(s is None for s in shapes) \
            or [s.rank() for s in shapes] != [4, 5, 4, 4] or not all(map(n.passes_through, steps)):
        return None
    (batch, groups, seq, width), repeated, heads = list(shapes[0]), list(shapes[1]), list(shapes[2])
    if not (isinstance(groups, int) and isinstance(repeated[2], int) and heads[1] == groups * repeated[2]
            and shapes[3][1] == heads[1] and all(map(same_dim, (batch, groups, seq, width), repeated[:2] + repeated[3:]))
            and all(map(same_dim, (batch, seq, width), heads[:1] + heads[2:]))):
        return None
    return kv, groups, swapped


def _is_swap_of_full_batch(n, i: int) -> bool:
    """Operand i is a Transpose swapping the last two axes of a carrying tensor and has the output's batch
    dims: its ĝ can be emitted transposed back, and the Transpose's own VJP (a transpose) cancels it."""
    v, y = n.raw(i), n.raw_out(0)
    producer = v.producer()
    while producer is not None and producer.op_type == "Mul":  # through scalar scaling, as in q·√s @ (kᵀ·√s)
        scalars = [x for x in producer.inputs if x is not None and x.shape is not None and x.shape.rank() == 0]
        carried = [x for x in producer.inputs if n.carries(x)]
        if len(scalars) != 1 or len(carried) != 1:
            return False
        producer = carried[0].producer()
    if producer is None or producer.op_type != "Transpose" or not n.carries(producer.inputs[0]):
        return False
    r, perm = n.rank(i), list(node_attr(producer, "perm") or [])
    if r is None or r < 3 or perm != list(range(r - 2)) + [r - 1, r - 2] or y.shape is None or y.shape.rank() != r \
            or n.rank(1 - i) != r:
        return False
    return all(same_dim(d, e) for d, e in zip(list(v.shape)[:-2], list(y.shape)[:-2]))


def matmul_weight_grad(n, g, weight=None):
    """ĝ_a of y = a @ W for a weight W [K, N] that carries no relevance (input 1, or the float `weight` of
    its shape: a quantized op's dequantized weight): ĝ_y · Wᵀ as a Gemm with
    transB=1 on ĝ_y flattened to [-1, N], so no transposed copy of W is ever stored (onnxruntime's constant
    folding would keep one per Transpose(W)). The Reshape back to [..., K] also keeps the Gemm's output
    from feeding a Sum directly (GemmSumFusion crashes on that pattern)."""
    b, w = n.b, n.raw(1)
    weight = n.x(1) if weight is None else weight
    if n.rank(1) != 2:   # a batched weight: the general form
        return n.unbroadcast(b.MatMul(g, _swap_last(n, weight, n.rank(1))), 0, core=2)
    dims = list(w.shape) if w.shape is not None else [None, None]
    cols = b.i64([-1, dims[1]]) if isinstance(dims[1], int) else b.Concat(b.i64([-1]), b.Shape(w, start=1), axis=0)
    flat = b.Gemm(b.Reshape(g, cols), weight, transB=1)
    # ĝ_a is shaped like a (its one row, when ĝ is row-compact); every ĝ·Wᵀ into a reshapes to the same
    # target, which lets optimise.accumulate_in_gemm sum them
    return b.Reshape(flat, n.grad_shape(0))


def gemm(n, g):
    """y = α A'B' + βC (A' = Aᵀ if transA, B' = Bᵀ if transB). The VJPs are emitted as MatMul, not Gemm:
    onnxruntime's GemmSumFusion crashes on an emitted Gemm whose output is summed with another ĝ."""
    b = n.b
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    ta, tb = n.attr("transA", 0), n.attr("transB", 0)
    t = lambda v: b.Transpose(v, perm=[1, 0])  # noqa: E731
    tg = lambda v: b.Transpose(v, perm=n.grad_perm([1, 0]))  # noqa: E731  (ĝ keeps its K axis in front)
    scale = (lambda v: v) if alpha == 1.0 else (lambda v: b.Mul(v, b.f32(alpha)))
    b_prime = lambda: t(n.x(1)) if tb else n.x(1)  # noqa: E731
    a_prime = lambda: t(n.x(0)) if ta else n.x(0)  # noqa: E731
    grad_a = (lambda: scale(b.MatMul(b_prime(), tg(g)))) if ta else (lambda: scale(b.MatMul(g, t(b_prime()))))
    grad_b = (lambda: scale(b.MatMul(tg(g), a_prime()))) if tb else (lambda: scale(b.MatMul(t(a_prime()), g)))
    grad_c = lambda: n.unbroadcast_to(b.Mul(g, b.f32(beta)), n.raw(2), n.raw_out(0))
    return (grad_a, grad_b, grad_c)


def conv(n, g, weight=None):
    """weight: the float weight when it is not input 1 as it stands (a quantized op's dequantized weight)."""
    b = n.b
    weight = n.x(1) if weight is None else weight
    x, w, y = n.raw(0), n.raw(1), n.raw_out(0)
    kw = dict(strides=n.attr("strides"), pads=n.attr("pads"), dilations=n.attr("dilations"),
              group=n.attr("group", 1))
    if n.attr("auto_pad", "NOTSET") != "NOTSET":
        kernel = conv_family.static_weight(n, "auto_pad")[2:]
        geo = conv_family.geometry(n, len(kernel))
        kw["pads"] = conv_family.explicit_pads(n, kernel, geo["strides"], geo["dilations"])
    out_pad = None
    spatial_known = lambda v: v.shape is not None and all(isinstance(d, int) for d in list(v.shape)[2:])  # noqa: E731
    if all(map(spatial_known, (x, y, w))):  # the batch and channel dims play no part (batch is often dynamic)
        spatial = x.shape.rank() - 2
        strides = kw["strides"] or [1] * spatial
        pads = kw["pads"] or [0] * (2 * spatial)
        dil = kw["dilations"] or [1] * spatial
        out_pad = []
        for i in range(spatial):
            full = (y.shape[i + 2] - 1) * strides[i] - pads[i] - pads[i + spatial] + dil[i] * (w.shape[i + 2] - 1) + 1
            out_pad.append(int(x.shape[i + 2] - full))
        out_pad = out_pad if any(out_pad) else None
    def grad_x():
        if not n.lead:
            return b.ConvTranspose(g, weight, output_padding=out_pad, **kw)
        folded = b.Reshape(g, b.Concat(b.i64([-1]), b.Shape(g, start=2), axis=0))  # K into batch: [K·B, C, …]
        return b.Reshape(b.ConvTranspose(folded, weight, output_padding=out_pad, **kw), n.grad_shape(0))
    def grad_w():   # W [O, C/G, k…]: x read, ĝ_y written
        w = conv_family.static_weight(n, "weights that carry relevance")
        geo = {**conv_family.geometry(n, len(w) - 2), **({"pads": kw["pads"]} if kw["pads"] else {})}
        return conv_family.weight_grad(n, n.x(0), g, w[1] * kw["group"], w[2:], geo)
    return (grad_x, grad_w,
            lambda: b.ReduceSum(g, b.i64([n.grad_axis(a) for a in [0] + list(range(2, n.rank(0)))]), keepdims=0))


def einsum(n, g):
    eq = n.attr("equation").replace(" ", "")
    lhs, out = eq.split("->") if "->" in eq else (eq, None)
    if out is None:   # implicit: the letters that occur once, in alphabetical order (behind an ellipsis)
        letters = lhs.replace(",", "").replace(".", "")
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) == 1:
        return (lambda: _einsum_one(n, g, terms[0], out),)
    if len(terms) != 2 or "." in eq:
        raise LrpcError(f"node '{n.node.name}' (Einsum '{eq}'): only one or two operands, two without an "
                        "ellipsis, are supported")
    a, c = terms

    def grad(i):
        own, other = (a, c) if i == 0 else (c, a)
        if not set(own) <= set(out) | set(other):
            raise LrpcError(f"node '{n.node.name}' (Einsum '{eq}'): an index summed inside one operand is not "
                            "supported")
        k = next(c for c in "KLMNOPQRSTUVWXYZklmnopqrstuvwxyz" if c not in eq) if n.lead else ""  # ĝ's K axis
        return n.b.Einsum(g, n.x(1 - i), equation=f"{k}{out},{other}->{k}{own}")
    return (lambda: grad(0), lambda: grad(1))


def _einsum_one(n, g, term: str, out: str):
    """One operand (a transpose, a sum, a diagonal, with or without an ellipsis): ĝ_x = ĝ_y times a ones vector
    for each index summed away and an identity for each repeat of an index, as one Einsum: 'ij->i' gives
    'i,j->ij' with ones, '...ii->...i' gives '...i,iI->...iI' with the identity."""
    b, eq = n.b, f"{term}->{out}"
    fresh = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in eq)
    k = next(fresh) if n.lead else ""   # ĝ's K axis
    letters = term.replace("...", "")
    r = n.rank(0)
    if r is None:
        raise LrpcError(f"node '{n.node.name}' (Einsum '{eq}'): the rank of the operand must be known")
    dots = term.find("...")

    def axis(position: int) -> int:   # the operand axis of the letter at `position` in `letters`
        return position if dots < 0 or position < dots else position + r - len(letters)

    def size(position: int):
        return b.Shape(n.raw(0), start=axis(position), end=axis(position) + 1)

    renamed, operands, terms, seen = [], [], [], set()
    for position, letter in enumerate(letters):
        if letter in seen:   # a repeat: its own letter, tied to the first by an identity
            other = next(fresh)
            renamed.append(other)
            terms.append(letter + other)
            operands.append(b.EyeLike(b.ConstantOfShape(b.Concat(size(position), size(position), axis=0),
                                                        value=ir.tensor([0.0], dtype=ir.DataType.FLOAT))))
            continue
        seen.add(letter)
        renamed.append(letter)
        if letter not in out:   # summed away: ĝ is the same along it
            terms.append(letter)
            operands.append(b.ConstantOfShape(size(position), value=ir.tensor([1.0], dtype=ir.DataType.FLOAT)))
    target = "".join(renamed)
    if dots >= 0:
        target = target[:dots] + "..." + target[dots:]
    return b.Einsum(g, *operands, equation=",".join([k + out] + terms) + f"->{k}{target}")


def det(n, g):
    """y = det A over the last two axes [M, M]: ĝ_A = ĝ_y ⊙ cof(A), the cofactors (−1)^(i+j) det(minor_ij) —
    exact also for a singular A — for a static M: all M² minors gathered at once, one Det."""
    b, r = n.b, n.rank(0)
    dims = n.raw(0).shape
    if r is None or not isinstance(dims[-1], int):
        raise LrpcError(f"node '{n.node.name}' (Det): the matrix size must be static")
    m = dims[-1]

    def grad():
        spread = b.Unsqueeze(g, b.i64([-2, -1]))
        if m == 1:
            return spread
        keep = np.array([[k for k in range(m) if k != i] for i in range(m)], np.int64)   # [M, M−1]: all but i
        rows = b.Gather(n.x(0), b.i64(keep), axis=r - 2)                                 # [..., i, M−1, M]
        minors = b.Gather(rows, b.i64(keep), axis=r)                                     # [..., i, M−1, j, M−1]
        lead = list(range(r - 2))
        cofactors = b.Det(b.Transpose(minors, perm=lead + [r - 2, r, r - 1, r + 1]))     # [..., i, j]
        signs = np.fromfunction(lambda i, j: (-1.0) ** (i + j), (m, m)).astype(np.float32)
        return b.Mul(spread, b.Mul(cofactors, b.f32(signs)))
    return (grad,)


def arange(n, g):
    """Range y_i = start + i·delta (float): ĝ_start = Σ_i ĝ_i, ĝ_delta = Σ_i i·ĝ_i; the limit only sets the count,
    a step function of it (no ĝ)."""
    b = n.b
    index = b.Range(b.f32(0.0), b.Cast(b.Size(n.raw_out(0)), to=1), b.f32(1.0))
    return (lambda: b.ReduceSum(g, b.i64([-1]), keepdims=0), None,
            lambda: b.ReduceSum(b.Mul(g, index), b.i64([-1]), keepdims=0))
