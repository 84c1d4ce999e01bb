"""Exact VJPs of ops whose every float input may carry relevance (convolution weights, resize and grid inputs,
matrices), against torch autograd: s = Σ w ⊙ y for fixed random w, R = x ⊙ ∂s/∂x for every float input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as tf
from onnx import TensorProto, helper, numpy_helper

import lrpc

RNG = np.random.default_rng(18)


def relevance(node, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray] = (), opset: int = 21,
              indices: dict[str, np.ndarray] = ()):
    """lrpc's gxi relevance of every input in `inputs` for s = Σ w ⊙ y, y the node's first output (`indices`:
    int64 inputs known only at run time)."""
    consts, indices = dict(consts), dict(indices)
    declared = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()] + \
        [helper.make_tensor_value_info(k, TensorProto.INT64, v.shape) for k, v in indices.items()]
    probe = helper.make_model(helper.make_graph(
        [node], "probe", declared,
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()]), opset_imports=[helper.make_opsetid("", opset)])
    feed = {**inputs, **indices}
    y = ort.InferenceSession(probe.SerializeToString()).run(None, feed)[0]
    w = RNG.uniform(0.5, 1.5, y.shape).astype(np.float32)
    graph = probe.graph
    graph.initializer.extend([numpy_helper.from_array(w, "w_s"), numpy_helper.from_array(np.array([1, 1]), "one")])
    graph.node.extend([helper.make_node("Mul", [node.output[0], "w_s"], ["weighted_s"]),
                       helper.make_node("ReduceSum", ["weighted_s"], ["total_s"], keepdims=0),
                       helper.make_node("Reshape", ["total_s", "one"], ["s"])])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1]))
    explainer = lrpc.compile(probe, preset="gxi", attribute=list(inputs), output_name="s")
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([f"relevance.{k}" for k in inputs], {**feed, "lrp_target": np.zeros(1, np.int64)})
    return dict(zip(inputs, outs)), w


def torch_relevance(fn, inputs: dict[str, np.ndarray], w: np.ndarray) -> dict[str, np.ndarray]:
    """x ⊙ ∂(Σ w ⊙ fn(**x))/∂x by torch autograd, in float64."""
    xs = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}
    (fn(**xs) * torch.tensor(w, dtype=torch.float64)).sum().backward()
    return {k: (x * x.grad).detach().numpy() for k, x in xs.items()}


def check(node, inputs, fn, consts=(), opset=21, indices=()):
    got, w = relevance(node, inputs, consts, opset, indices)
    want = torch_relevance(fn, inputs, w)
    for k in inputs:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max(), err_msg=k)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_conv_with_input_dependent_weights():
    x, w, b = rand(2, 4, 9, 7), rand(6, 2, 3, 2), rand(6)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], group=2, strides=[2, 1], dilations=[1, 2],
                            pads=[1, 0, 2, 1])
    check(node, {"x": x, "W": w, "B": b},
          lambda x, W, B: tf.conv2d(tf.pad(x, (0, 1, 1, 2)), W, B, stride=(2, 1), dilation=(1, 2), groups=2))


def test_conv_same_padding_weights():
    x, w = rand(1, 2, 5, 6), rand(3, 2, 3, 3)
    node = helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    # SAME_UPPER, stride 2: total pads 2 (rows) and 1 (columns), the odd one at the end
    check(node, {"x": x, "W": w}, lambda x, W: tf.conv2d(tf.pad(x, (0, 1, 1, 1)), W, stride=2))


def test_conv_transpose_input_weights_bias():
    x, w, b = rand(2, 4, 3, 5), rand(4, 3, 3, 2), rand(6)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], group=2, strides=[2, 3], pads=[1, 0, 0, 1],
                            output_padding=[1, 2], dilations=[1, 2])

    def fn(x, W, B):
        full = tf.conv_transpose2d(x, W, B, stride=(2, 3), output_padding=(1, 2), groups=2, dilation=(1, 2))
        return full[:, :, 1:, :-1]
    check(node, {"x": x, "W": w, "B": b}, fn)


def test_col2im_is_torch_fold():
    x = rand(2, 3 * 2 * 2, 9)   # L = 3 × 3 blocks
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=[2, 1], pads=[1, 0, 0, 0],
                            dilations=[1, 2])
    consts = {"image": np.array([6, 5]), "block": np.array([2, 2])}
    check(node, {"x": x},
          lambda x: tf.fold(x, (7, 5), (2, 2), stride=(2, 1), dilation=(1, 2))[:, :, 1:, :], consts)


@pytest.mark.parametrize("mode, torch_mode, extra", [
    ("linear", "bilinear", {}),
    ("cubic", "bicubic", {}),
    ("linear", "bilinear-corners", {"coordinate_transformation_mode": "align_corners"}),
    ("nearest", "nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
])
def test_resize_is_torch_interpolate(mode, torch_mode, extra):
    x = rand(2, 3, 4, 5)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode, **extra)
    corners = torch_mode.endswith("-corners")
    kw = {} if mode == "nearest" else {"align_corners": corners}
    check(node, {"x": x}, lambda x: tf.interpolate(x, size=(7, 3), mode=torch_mode.removesuffix("-corners"), **kw),
          {"sizes": np.array([2, 3, 7, 3])})


@pytest.mark.parametrize("policy, sizes, scale", [("not_larger", [6, 12], 1.5), ("not_smaller", [6, 12], 2.0),
                                                  ("not_larger", [2, 5], 0.5)])
@pytest.mark.parametrize("mode, torch_mode", [("linear", "bilinear"), ("cubic", "bicubic")])
def test_resize_keeping_the_aspect_ratio_is_torch_interpolate(policy, sizes, scale, mode, torch_mode):
    # one scale for both axes (the sizes' smallest or largest ratio to the input's), rounded sizes that torch's
    # floored ones equal here
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode, axes=[2, 3],
                            keep_aspect_ratio_policy=policy)
    check(node, {"x": rand(2, 3, 4, 6)},
          lambda x: tf.interpolate(x, scale_factor=scale, mode=torch_mode, align_corners=False,
                                   recompute_scale_factor=False), {"sizes": np.array(sizes)})


def check_central_differences(got: dict[str, np.ndarray], s, inputs: dict[str, np.ndarray], step=1e-6, rtol=1e-4):
    """`got` against x ⊙ ∂s/∂x of every input by central differences of s (float64 inputs)."""
    for name, value in inputs.items():
        want = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += step
            down[i] -= step
            want[i] = value[i] * (s({**inputs, name: up}) - s({**inputs, name: down})) / (2 * step)
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("mode, scale, pooling", [("half_pixel", 1.0, "avg"), ("output_half_pixel", 0.5, "avg"),
                                                  ("half_pixel", 1.0, "max"), ("output_half_pixel", 0.5, "max")])
def test_roi_align_rois_is_finite_differences(mode, scale, pooling):
    # relevance into X and into the rois (one partly outside the image, one shorter than a pixel), against
    # central differences of onnxruntime's own RoiAlign in float64; max mode: the largest weighted pixel per bin
    # (no two samples of a bin symmetric about a pixel: their equal weights would tie, a kink)
    x = rand(2, 3, 5, 6)
    rois = np.array([[0.63, 1.3, 4.27, 3.9], [-1.6, 0.7, 3.1, 9.4], [2.3, 2.15, 2.9, 2.65]], np.float32) / scale
    batch = np.array([1, 0, 1])
    settings = dict(coordinate_transformation_mode=mode, output_height=2, output_width=3, sampling_ratio=2,
                    spatial_scale=scale, mode=pooling)
    node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], **settings)
    got, w = relevance(node, {"x": x, "rois": rois}, indices={"batch": batch}, opset=16)
    double = helper.make_model(helper.make_graph(
        [node], "double", [helper.make_tensor_value_info(k, TensorProto.DOUBLE, None) for k in ("x", "rois")] +
        [helper.make_tensor_value_info("batch", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)]), opset_imports=[helper.make_opsetid("", 16)])
    session = ort.InferenceSession(double.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {"x": x.astype(np.float64), "rois": rois.astype(np.float64)}
    s = lambda feed: float(np.sum(w * session.run(None, {**feed, "batch": batch})[0]))  # noqa: E731
    check_central_differences(got, s, inputs)


def _resize_crop(axes, extrapolation=0.5, mode="linear", **extra):
    return helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode=mode, axes=axes,
                            coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=extrapolation,
                            **extra)


@pytest.mark.parametrize("mode, roi, axes, sizes, extra", [
    ("linear", [0.1, 0.2, 0.7, 0.9], [2, 3], [3, 4], {}),
    ("linear", [-0.2, 0.3, 1.3, 0.6], [3, 2], [3, 6], {}),
    ("linear", [0.0, 0.0, -0.15, 0.3, 1.0, 1.0, 0.85, 1.4], None, [1, 1, 3, 4], {}),
    ("cubic", [0.1, 0.2, 0.7, 0.9], [2, 3], [3, 4], {}),
    ("cubic", [-0.2, 0.15, 0.75, 1.3], [2, 3], [4, 3], {"extrapolation": 2.0}),
    ("cubic", [0.05, 0.3, 0.9, 0.95], [2, 3], [3, 7], {"exclude_outside": 1, "cubic_coeff_a": -0.5})])
def test_resize_crop_roi_is_finite_differences(mode, roi, axes, sizes, extra):
    # relevance into X and tf_crop_and_resize's roi (boxes partly outside the image: extrapolated outputs), against
    # central differences of ONNX's reference evaluator in float64 (onnxruntime computes the same here); its cubic
    # rounds the roi to float32, so the step is 2.5e-4 there, the tolerance that of the rounding and of O(step²)
    from onnx.reference import ReferenceEvaluator
    # (every resized size changes; no sample on a pixel, a kink)
    x, roi, sizes = rand(1, 1, *((4, 5) if mode == "linear" else (5, 6))), np.array(roi, np.float32), np.array(sizes)
    node = _resize_crop(axes, mode=mode, **extra)
    got, w = relevance(node, {"x": x, "roi": roi}, {"sizes": sizes})
    double = helper.make_model(helper.make_graph(
        [node], "double", [helper.make_tensor_value_info(k, TensorProto.DOUBLE, None) for k in ("x", "roi")],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], [numpy_helper.from_array(sizes, "sizes")]),
        opset_imports=[helper.make_opsetid("", 21)])
    evaluator = ReferenceEvaluator(double)
    inputs = {"x": x.astype(np.float64), "roi": roi.astype(np.float64)}
    s = lambda feed: float(np.sum(w * evaluator.run(None, feed)[0]))  # noqa: E731
    check_central_differences(got, s, inputs, **({"step": 2.5e-4, "rtol": 1e-3} if mode == "cubic" else {}))


def test_resize_crop_roi_of_an_unresized_axis_gets_nothing():
    # onnxruntime crops no axis whose size stays (here the rows, 4 → 4): their roi moves nothing, and gets no
    # relevance, while the columns' roi does
    x, roi = rand(1, 1, 4, 5), np.array([0.2, 0.1, 0.7, 0.8], np.float32)
    node = _resize_crop([2, 3])
    got, _ = relevance(node, {"x": x, "roi": roi}, {"sizes": np.array([4, 3])})
    run = lambda r: ort.InferenceSession(helper.make_model(helper.make_graph(  # noqa: E731
        [node], "crop", [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("x", "roi")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([4, 3]), "sizes")]), opset_imports=[helper.make_opsetid("", 21)])
        .SerializeToString()).run(None, {"x": x, "roi": r})[0]
    assert np.array_equal(run(roi), run(roi + np.array([0.1, 0, 0.1, 0], np.float32)))
    assert got["roi"][0] == 0 and got["roi"][2] == 0 and np.all(got["roi"][[1, 3]] != 0)


@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
@pytest.mark.parametrize("reduction, ignore", [("mean", None), ("mean", 1), ("sum", 1), ("none", None)])
def test_loss_class_weight_is_torch(op, reduction, ignore):
    # relevance into the scores and into the class weight (torch's nll_loss does not differentiate its weight:
    # the loss written out, −w[t]·scores_t per element, summed or averaged over Σ w[t])
    x, w, t = rand(3, 4, 2), RNG.uniform(0.5, 2.0, 4).astype(np.float32), np.array([[1, 2], [0, 1], [3, 3]])
    node = helper.make_node(op, ["x", "t", "w"], ["y"], reduction=reduction,
                            **({} if ignore is None else {"ignore_index": ignore}))

    def loss(x, w):
        scores = torch.log_softmax(x, 1) if op == "SoftmaxCrossEntropyLoss" else x
        target = torch.tensor(t)
        keep = torch.ones(t.shape, dtype=torch.float64) if ignore is None else (target != ignore).double()
        safe = torch.where(target == (-1 if ignore is None else ignore), 0, target)
        weight = w[safe] * keep
        per_element = -weight * torch.gather(scores, 1, safe.unsqueeze(1)).squeeze(1)
        return {"none": per_element, "sum": per_element.sum()}.get(reduction, per_element.sum() / weight.sum())
    check(node, {"x": x, "w": w}, loss, indices={"t": t})


@pytest.mark.parametrize("align_corners", [0, 1])
def test_affine_grid_is_torch_affine_grid(align_corners):
    theta = rand(2, 2, 3)
    node = helper.make_node("AffineGrid", ["theta", "size"], ["y"], align_corners=align_corners)
    check(node, {"theta": theta},
          lambda theta: tf.affine_grid(theta, [2, 3, 4, 5], align_corners=bool(align_corners)),
          {"size": np.array([2, 3, 4, 5])}, opset=20)


def test_det_is_torch_det():
    a = rand(2, 3, 4, 4)
    a[1, 2, 3] = a[1, 2, 0]   # a singular matrix: its cofactors are still the derivative
    check(helper.make_node("Det", ["a"], ["y"]), {"a": a}, lambda a: torch.linalg.det(a))


def test_lrn_is_torch_local_response_norm():
    x = rand(2, 5, 3, 4)
    node = helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.2, beta=0.6, bias=1.3)   # odd: onnxruntime
    check(node, {"x": x}, lambda x: tf.local_response_norm(x, 3, alpha=0.2, beta=0.6, k=1.3))


@pytest.mark.parametrize("mode, padding, align", [("linear", "zeros", 0), ("cubic", "border", 1),
                                                  ("nearest", "reflection", 0)])
def test_grid_sample_is_torch_grid_sample(mode, padding, align):
    x, grid = rand(2, 3, 4, 5), RNG.uniform(-1.2, 1.2, (2, 3, 6, 2)).astype(np.float32)
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    torch_mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    check(node, {"x": x}, lambda x: tf.grid_sample(x, torch.tensor(grid, dtype=torch.float64), mode=torch_mode,
                                                   padding_mode=padding, align_corners=bool(align)),
          {"grid": grid})


@pytest.mark.parametrize("mode, padding, align", [("linear", "zeros", 0), ("linear", "border", 1),
                                                  ("cubic", "zeros", 1), ("cubic", "border", 0), ("nearest", "zeros", 0)])
def test_grid_sample_grid_is_torch_grid_sample(mode, padding, align):
    # relevance into the sampling coordinates too (padding applied per pixel, as torch does for these modes)
    x, grid = rand(2, 3, 4, 5), RNG.uniform(-1.2, 1.2, (2, 3, 6, 2)).astype(np.float32)
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    torch_mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    check(node, {"x": x, "grid": grid}, lambda x, grid: tf.grid_sample(x, grid, mode=torch_mode, padding_mode=padding,
                                                                       align_corners=bool(align)))


@pytest.mark.parametrize("mode, padding, align", [("linear", "zeros", 0), ("linear", "border", 1),
                                                  ("linear", "reflection", 0), ("nearest", "zeros", 1)])
def test_grid_sample_3d_grid_is_torch_grid_sample(mode, padding, align):
    # 3-D sampling (opset 20): relevance into the volume and into its (x, y, z) coordinates
    x, grid = rand(2, 2, 3, 4, 5), RNG.uniform(-1.2, 1.2, (2, 2, 3, 2, 3)).astype(np.float32)
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    check(node, {"x": x, "grid": grid}, lambda x, grid: tf.grid_sample(
        x, grid, mode="bilinear" if mode == "linear" else mode, padding_mode=padding, align_corners=bool(align)),
          opset=20)


@pytest.mark.parametrize("inverse, onesided, length", [(0, 0, None), (0, 1, 6), (1, 0, 3), (1, 1, None)])
def test_dft_is_torch_fft(inverse, onesided, length):
    complex_input = inverse or not onesided
    x = rand(2, 4, 5, 2 if complex_input else 1)
    inputs, consts = ["x", "length" if length else "", "axis"], {"axis": np.array(2)}
    if length:
        consts["length"] = np.array(length)
    node = helper.make_node("DFT", inputs, ["y"], inverse=inverse, onesided=onesided)

    def fn(x):
        z = torch.complex(x[..., 0], x[..., 1]) if complex_input else x[..., 0]
        if inverse and onesided:
            return torch.fft.irfft(z, dim=2).unsqueeze(-1)
        f = (torch.fft.ifft if inverse else torch.fft.rfft if onesided else torch.fft.fft)(z, n=length, dim=2)
        return torch.stack([f.real, f.imag], -1)
    check(node, {"x": x}, fn, consts)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter_writes_and_reads_back(mode):
    cache, update = rand(3, 2, 5, 4), rand(3, 2, 2, 4)
    where = np.array([0, 3, 4] if mode == "circular" else [0, 3, 2])   # circular: row 4 wraps to row 0
    node = helper.make_node("TensorScatter", ["cache", "update", "where"], ["y"], axis=2, mode=mode)

    def fn(cache, update):
        rows = [torch.arange(2) + int(w) for w in where]
        out = cache.clone()
        for b, r in enumerate(rows):
            out[b, :, r % 5] = update[b]
        return out
    check(node, {"cache": cache, "update": update}, fn, {"where": where}, opset=24)


def test_pow_with_a_carrying_exponent():
    x, p = RNG.uniform(0.2, 2.0, (3, 4)).astype(np.float32), rand(3, 4)
    check(helper.make_node("Pow", ["x", "p"], ["y"]), {"x": x, "p": p}, lambda x, p: x ** p)


@pytest.mark.parametrize("reduction", ["max", "min"])
def test_scatter_elements_max_min(reduction):
    data, updates, index = rand(3, 5), rand(3, 4), np.array([[0, 2, 2, 4], [1, 1, 3, 0], [4, 4, 4, 4]])
    node = helper.make_node("ScatterElements", ["data", "index", "updates"], ["y"], axis=1, reduction=reduction)
    check(node, {"data": data, "updates": updates},
          lambda data, updates: data.scatter_reduce(1, torch.tensor(index), updates, reduce="a" + reduction),
          {"index": index})


def test_slice_with_run_time_axes_and_steps():
    x = rand(3, 6, 5)
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    indices = {"starts": np.array([-1, 0]), "ends": np.array([0, 6]), "axes": np.array([2, 1]),
               "steps": np.array([-2, 2])}
    check(node, {"x": x}, lambda x: x[:, 0:6:2, :][:, :, [4, 2]], indices=indices)


def test_batch_normalization_in_training_mode():
    x, scale, bias = rand(4, 3, 2, 5), rand(3), rand(3)
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y", "run_mean", "run_var"],
                            training_mode=1)

    def fn(x, scale, bias):   # batch statistics (population variance) per channel
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * scale[:, None, None] + bias[:, None, None]
    check(node, {"x": x, "scale": scale, "bias": bias}, fn,
          {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}, opset=15)


def test_stft_signal_and_window_are_torch_stft():
    signal, window = rand(2, 29, 1), RNG.uniform(0.2, 1.0, 8).astype(np.float32)
    node = helper.make_node("STFT", ["signal", "hop", "window"], ["y"], onesided=1)   # (see the registry recipe)

    def fn(signal, window):
        spectrum = torch.stft(signal[..., 0], 8, hop_length=3, window=window, center=False, onesided=True,
                              return_complex=True)                       # [B, bins, frames]
        return torch.stack([spectrum.real, spectrum.imag], -1).transpose(1, 2)
    check(node, {"signal": signal, "window": window}, fn, {"hop": np.array(3)}, opset=17)
