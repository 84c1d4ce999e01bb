"""com.microsoft FusedMatMul written out in standard ops (lrpc.decompose): onnxruntime's optimiser folds the
transposes and the scalar scale around a MatMul into it (MatmulTransposeFusion, MatMulScaleFusion), so a model
saved after onnxruntime's extended optimisations (a quantize_dynamic model's Q·Kᵀ, for one) carries it. The
decomposition is that MatMul again, so the passes find Q·Kᵀ as the product of two carrying operands."""

from __future__ import annotations

from lrpc.fused_common import fail
from lrpc.graph import attr


def fused_matmul(node, b, ctx):
    """alpha · op(A) @ op(B): op moves the first axis to just before the last two (transBatchA / transBatchB:
    [d0, d1, …, dn-2, dn-1] read as [d1, …, dn-2, d0, dn-1]), then swaps the last two (transA / transB)."""
    a, c = (_operand(b, node, i, attr(node, f"transBatch{side}", 0), attr(node, f"trans{side}", 0))
            for i, side in enumerate("AB"))
    y = b.MatMul(a, c)
    alpha = float(attr(node, "alpha", 1.0))
    return [y if alpha == 1.0 else b.Mul(y, b.scalar(alpha))]


def _operand(b, node, index: int, trans_batch: int, trans: int):
    x = node.inputs[index]
    if not (trans_batch or trans):
        return x
    rank = b.rank(x)
    if rank is None or rank < 2:
        raise fail(node, f"transBatch / trans on input {index} of {'unknown rank' if rank is None else 'rank 1'}")
    perm = list(range(rank))
    if trans_batch:
        perm = perm[1:rank - 1] + [0, rank - 1]
    if trans:
        perm[-2], perm[-1] = perm[-1], perm[-2]
    return b.Transpose(x, perm=perm)
