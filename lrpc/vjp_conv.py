"""VJPs of the convolution family beyond Conv's input: Conv/ConvTranspose weights, ConvTranspose, Col2Im
(docs/design.md, "Relevance semantics"). Each is linear in the operand its ĝ goes to, and its VJP is
another convolution of the forward's geometry."""

from __future__ import annotations

import onnx_ir as ir

from lrpc.vjp_common import forward_dims, refuse


def geometry(n, spatial: int) -> dict:
    """strides, pads, dilations of a Conv-like node, defaults written out."""
    return dict(strides=list(n.attr("strides") or [1] * spatial), pads=list(n.attr("pads") or [0] * (2 * spatial)),
                dilations=list(n.attr("dilations") or [1] * spatial))


def explicit_pads(n, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """A Conv's or pooling's pads with auto_pad written out (SAME_*: from the static spatial dims, the odd
    one at the end for SAME_UPPER)."""
    k, auto_pad = len(kernel), n.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * k)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = forward_dims(n)
        if dims is None or not all(isinstance(d, int) for d in dims[2:]):
            refuse(n, f"auto_pad={auto_pad} needs static spatial dims")
        total = [max((-(-d // s) - 1) * s + (kk - 1) * dl + 1 - d, 0)
                 for d, s, kk, dl in zip(dims[-k:], strides, kernel, dilations)]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        return small + big if auto_pad == "SAME_UPPER" else big + small
    if auto_pad != "NOTSET":
        refuse(n, f"auto_pad={auto_pad} is not supported")
    return list(n.attr("pads") or [0] * (2 * k))


def static_weight(n, needed_by: str) -> list[int]:
    """The static shape of a Conv-like node's weight (input 1), else a refusal."""
    w = n.raw(1).shape
    if w is None or not all(isinstance(d, int) for d in w):
        refuse(n, f"{needed_by} need a static weight shape")
    return list(w)


def weight_grad(n, inp, out_grad, channels: int, kernel: list[int], geo: dict, grad_in: bool = False):
    """Σ_batch Σ_pos out_grad[b, o, pos] · inp_padded[b, c, pos·stride + k·dilation] as [O, C/G, k…]: the
    weight ĝ of a grouped convolution (inp [B, C, …] read, out_grad [B, O, …] written, C = `channels`), one
    Conv with the batch as channels (group-major) and the roles of stride and dilation swapped.

    Under --targets one of the two is a ĝ [K, B, …] (inp when `grad_in`) and the result is [K, O, C/G, k…]:
    a K on inp rides in that Conv's batch, a K on out_grad in its output channels (within each group)."""
    b, group = n.b, n.attr("group", 1)
    spatial = len(kernel)
    rest = list(range(3, 3 + spatial))
    k_in, k_out = bool(n.lead) and grad_in, bool(n.lead) and not grad_in
    # inp [B, C, S…] → [C/G, G·B, S…]: channel g·B + b holds group g of batch row b (with K: [K·C/G, G·B, S…])
    lead = [n.k_shape] if k_in else []
    split_in = b.Reshape(inp, b.Concat(*lead, b.i64([-1, group, channels // group]),
                                       b.Shape(inp, start=2 + len(lead)), axis=0))
    first = [0, 3, 2, 1] if k_in else [2, 1, 0]
    sizes = b.Concat(b.i64([-1]), b.Mul(b.Shape(inp, start=1, end=2), b.i64([group])), b.Shape(inp, start=3),
                     axis=0) if k_in else b.Concat(b.i64([channels // group, -1]), b.Shape(inp, start=2), axis=0)
    batch_in = b.Reshape(b.Transpose(split_in, perm=first + [a + len(lead) for a in rest]), sizes)
    space = list(range(2, 2 + spatial))
    if k_out:   # out_grad [K, B, O, T…] → [G, K, O/G, B, T…] → weights [G·K·O/G, B, T…]
        split = b.Reshape(out_grad, b.Concat(n.k_shape, b.Shape(out_grad, start=1, end=2), b.i64([group, -1]),
                                             b.Shape(out_grad, start=3), axis=0))
        weights = b.Reshape(b.Transpose(split, perm=[2, 0, 3, 1] + [a + 2 for a in space]),
                            b.Concat(b.i64([-1]), b.Shape(out_grad, start=1, end=2), b.Shape(out_grad, start=3),
                                     axis=0))
    else:   # out_grad [B, O, T…] → weights [O, B, T…] (O is already group-major)
        weights = b.Transpose(out_grad, perm=[1, 0] + space)
    full = b.Conv(batch_in, weights, group=group, strides=geo["dilations"], dilations=geo["strides"],
                  pads=geo["pads"])                                                  # [C/G, O, ≥k…]
    cut = b.Slice(full, b.i64([0] * spatial), b.i64(kernel), b.i64(space))
    if k_in:   # [K·C/G, O, k…] → [K, C/G, O, k…] → [K, O, C/G, k…]
        split = b.Reshape(cut, b.Concat(n.k_shape, b.i64([channels // group, -1] + kernel), axis=0))
        return b.Transpose(split, perm=[0, 2, 1] + [a + 1 for a in space])
    if k_out:  # [C/G, G·K·O/G, k…] → [C/G, G, K, O/G, k…] → [K, G, O/G, C/G, k…] → [K, O, C/G, k…]
        split = b.Reshape(cut, b.Concat(b.i64([channels // group, group]), n.k_shape, b.i64([-1] + kernel), axis=0))
        moved = b.Transpose(split, perm=[2, 1, 3, 0] + [a + 2 for a in space])
        return b.Reshape(moved, b.Concat(n.k_shape, b.i64([-1, channels // group] + kernel), axis=0))
    return b.Transpose(cut, perm=[1, 0] + space)


def fold_k(n, g, run):
    """run(ĝ) on ĝ with a K axis folded into the batch ([K·B, C, …]), reshaped back to [K, B, …]."""
    b = n.b
    if not n.lead:
        return run(g)
    folded = run(b.Reshape(g, b.Concat(b.i64([-1]), b.Shape(g, start=2), axis=0)))
    return b.Reshape(folded, b.Concat(n.k_shape, b.i64([-1]), b.Shape(folded, start=1), axis=0))


def _transpose_pads(n, spatial: int, geo: dict) -> list[int]:
    """ConvTranspose's pads with auto_pad / output_shape resolved (ONNX: total = s·(x−1) + out_pad +
    (k−1)·d + 1 − y, the odd one at the end for SAME_UPPER, at the start otherwise)."""
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    if auto_pad == "NOTSET" and n.attr("output_shape") is None:
        return geo["pads"]
    x, w, y = (v.shape for v in (n.raw(0), n.raw(1), n.raw_out(0)))
    if any(s is None or not all(isinstance(d, int) for d in list(s)[2:]) for s in (x, w, y)):
        refuse(n, f"auto_pad={auto_pad} / output_shape need static spatial dims")
    out_pad = list(n.attr("output_padding") or [0] * spatial)
    total = [geo["strides"][i] * (x[i + 2] - 1) + out_pad[i] + (w[i + 2] - 1) * geo["dilations"][i] + 1 - y[i + 2]
             for i in range(spatial)]
    total = [max(t, 0) for t in total]   # an output_shape past the full size: extra outputs at the end
    small = [t // 2 for t in total]
    if auto_pad == "SAME_UPPER":
        return small + [t - s for t, s in zip(total, small)]
    return [t - s for t, s in zip(total, small)] + small


def conv_transpose(n, g):
    """y = ConvTranspose(x, W) + B, the adjoint of Conv(·, W): ĝ_x = Conv(ĝ_y, W) of the same geometry,
    ĝ_W the weight ĝ with ĝ_y read and x written, ĝ_B the sum over batch and space."""
    b = n.b
    spatial = n.rank(0) - 2
    geo = geometry(n, spatial)
    geo["pads"] = _transpose_pads(n, spatial, geo)
    group = n.attr("group", 1)

    def grad_x():
        return fold_k(n, g, lambda v: b.Conv(v, n.x(1), group=group, **geo))

    def grad_w():   # W [C, O/G, k…]: the weight ĝ with ĝ_y [B, O, …] read and x written
        w = static_weight(n, "weights that carry relevance")
        return weight_grad(n, g, n.x(0), w[1] * group, w[2:], geo, grad_in=True)
    reduced = b.i64([n.grad_axis(a) for a in [0] + list(range(2, 2 + spatial))])
    return (grad_x, grad_w, lambda: b.ReduceSum(g, reduced, keepdims=0))


def col2im(n, g):
    """Col2Im scatters-adds each column of x [N, C·∏block, L] into the image: its adjoint gathers the blocks
    back (im2col), a depthwise Conv of ĝ_y with one-hot kernels: ĝ_x = Conv(ĝ_y, E) as [N, C·∏block, L]."""
    b = n.b
    image = n.raw_out(0).shape
    if image is None or not isinstance(image[1], int):
        refuse(n, "the channel count of the output must be static")
    channels, spatial = image[1], image.rank() - 2
    geo = geometry(n, spatial)

    def grad():
        block = b.Cast(n.raw(2), to=7)
        size = b.ReduceProd(block, keepdims=1)
        eye = b.EyeLike(b.ConstantOfShape(b.Concat(size, size, axis=0), value=ir.tensor([0.0], dtype=ir.DataType.FLOAT)))
        # one-hot kernels [C·∏block, 1, block…]: kernel c·∏block + j picks block position j of channel c
        kernels = b.Reshape(b.Tile(eye, b.i64([channels, 1])), b.Concat(b.i64([-1, 1]), block, axis=0))

        def run(v):
            patches = b.Conv(v, kernels, group=channels, **geo)                 # [N, C·∏block, L…]
            return b.Reshape(patches, b.Concat(b.Shape(v, end=1), b.i64([0, -1]), axis=0))
        return fold_k(n, g, run)
    return (grad, None, None)
