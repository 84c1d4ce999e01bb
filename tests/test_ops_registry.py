"""The op registry (lrpc.ops) against what compiles: every op with a VJP compiles under every preset on a
small graph, and under gxi its relevance is x ⊙ ∂y/∂x by central finite differences of the original model
(an oracle independent of lrpc); `lrpc ops` lists exactly the registry's ops; an op outside it fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc import ops
from lrpc.errors import LrpcError
from lrpc.presets import PRESETS

B, S, D, CLASSES = 2, 4, 5, 3
RNG = np.random.default_rng(3)
TARGET, POSITION = [1, 2], [1, 3]


def n(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output] if isinstance(output, str) else output, **attrs)


def const(shape, low=-1.0, high=1.0):
    return RNG.uniform(low, high, size=shape)


POSITIVE = [n("Mul", ["x", "x"], "sq"), n("Add", ["sq", "half"], "xp")]   # xp = x² + ½ > 0
GATHER_ND = np.stack(np.meshgrid(np.arange(B), np.arange(S), [0, 3], indexing="ij"), -1)   # [B, S, 2, 3]

# op → (nodes from the input x [B, S, D] to "o" [B, S, k], constants). One recipe per op with a VJP.
SMALL = [n("Tanh", ["x"], "xt"), n("Mul", ["xt", "third"], "xs")]   # xs = 0.9·tanh(x): inside (−1, 1) for any x
ABOVE_ONE = POSITIVE + [n("Add", ["xp", "one"], "x1")]          # x1 = x² + 1.5 > 1
CHANNELS_LAST = [n("Transpose", ["x"], "ncl", perm=[0, 2, 1])]   # [B, D, S] as [N, C, L] for the pools
BACK = n("Transpose", ["p"], "o", perm=[0, 2, 1])
UNARY = ["Abs", "Cos", "Sin", "Exp", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
         "HardSwish", "Softsign", "Erf", "Gelu", "Softplus", "Mish", "Neg", "Identity", "Dropout", "Sinh", "Cosh",
         "Asinh", "Atan", "Swish"]
RECIPES = {op: ([n(op, ["x"], "o")], {}) for op in UNARY}
RECIPES.update({op: (POSITIVE + [n(op, ["xp"], "o")], {}) for op in ("Sqrt", "Reciprocal", "Log")})
RECIPES.update({op: (SMALL + [n(op, ["xs"], "o")], {"third": np.array(0.9)}) for op in ("Tan", "Asin", "Acos",
                                                                                         "Atanh")})
RECIPES["Acosh"] = (ABOVE_ONE + [n("Acosh", ["x1"], "o")], {"one": np.array(1.0)})
RECIPES.update({op: (CHANNELS_LAST + [n(op, ["ncl"], "p", kernel_shape=[2], pads=[0, 1], **extra), BACK], {})
                for op, extra in (("AveragePool", {}), ("MaxPool", {}), ("LpPool", {"p": 2}))})
RECIPES.update({op: ([n(op, ["x"], "o")], {}) for op in ("GlobalAveragePool", "GlobalMaxPool")})
PER_CHANNEL = {"scale": const(S, 0.5, 1.5), "shift": const(S)}     # [B, S, D] read as [N, C, L]
RECIPES.update({op: ([n(op, ["x", "c"], "o")], {"c": const(D)}) for op in ("Add", "Sub", "Mul", "Max", "Min",
                                                                        "Sum", "Mean", "PRelu")})
RECIPES.update({op: ([n(op, ["x", "axes"], "o", keepdims=1)], {"axes": np.array([-1])})
                for op in ("ReduceSum", "ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceL1", "ReduceLogSumExp",
                           "ReduceMax", "ReduceMin", "ReduceProd")})
RECIPES["ReduceLogSum"] = (POSITIVE + [n("ReduceLogSum", ["xp", "axes"], "o", keepdims=1)], {"axes": np.array([-1])})
RECIPES.update({
    "ThresholdedRelu": ([n("ThresholdedRelu", ["x"], "o", alpha=0.1)], {}),
    "Cast": ([n("Cast", ["x"], "o", to=TensorProto.FLOAT)], {}),
    "CastLike": ([n("CastLike", ["x", "c"], "o")], {"c": const(1)}),
    "Div": ([n("Div", ["x", "c"], "o")], {"c": const(D, 0.5, 2.0)}),
    "Pow": (POSITIVE + [n("Pow", ["xp", "c"], "o")], {"c": const(D, 0.5, 2.5)}),
    "Where": ([n("Where", ["mask", "x", "c"], "o")], {"mask": np.array([True, False, True, True, False]),
                                                     "c": const(D)}),
    "Expand": ([n("ReduceSum", ["x", "last"], "r", keepdims=1), n("Expand", ["r", "shape"], "o")],
               {"last": np.array([-1]), "shape": np.array([B, S, D])}),
    "Clip": ([n("Clip", ["x", "lo", "hi"], "o")], {"lo": np.array(-0.5), "hi": np.array(0.7)}),
    "MatMul": ([n("MatMul", ["x", "w"], "o")], {"w": const((D, 6))}),
    "Gemm": ([n("Reshape", ["x", "flat"], "f"), n("Gemm", ["f", "w", "bias"], "g", alpha=0.7, beta=1.3),
              n("Reshape", ["g", "back"], "o")],
             {"flat": np.array([-1, D]), "w": const((D, 6)), "bias": const(6), "back": np.array([B, S, 6])}),
    "Conv": ([n("Transpose", ["x"], "t", perm=[0, 2, 1]), n("Conv", ["t", "w", "bias"], "c", pads=[1, 1]),
              n("Transpose", ["c"], "o", perm=[0, 2, 1])], {"w": const((6, D, 3)), "bias": const(6)}),
    "Einsum": ([n("Einsum", ["x", "w"], "o", equation="bsd,de->bse")], {"w": const((D, 6))}),
    "ConvTranspose": ([n("Transpose", ["x"], "t", perm=[0, 2, 1]),
                       n("ConvTranspose", ["t", "w", "bias"], "c", pads=[3, 3], strides=[2], output_padding=[1]),
                       n("Transpose", ["c"], "o", perm=[0, 2, 1])], {"w": const((D, 6, 3)), "bias": const(6)}),
    "Resize": ([n("Resize", ["x", "", "", "sizes"], "o", mode="linear")], {"sizes": np.array([B, S, 7])}),
    # x as images [B, 1, S, D]; roi r of image r, 4×3 bins of 2×2 samples: [2, 1, 4, 3] read as [B, S, 3]
    "RoiAlign": ([n("Unsqueeze", ["x", "one_axis"], "images"), n("RoiAlign", ["images", "rois", "image"], "r",
                                                                  output_height=S, output_width=3, sampling_ratio=2),
                  n("Reshape", ["r", "back"], "o")],
                 {"one_axis": np.array([1]), "rois": np.array([[0.2, 0.1, 3.7, 2.9], [1.0, 0.5, 4.6, 3.4]]),
                  "image": np.array([0, 1]), "back": np.array([B, S, 3])}),
    # x along S without a factor: the product of the others, zeros and all
    "CumProd": ([n("CumProd", ["x", "axis"], "o", exclusive=1, reverse=1)], {"axis": np.array(1)}),
    "GlobalLpPool": ([n("GlobalLpPool", ["x"], "o", p=3)], {}),
    # the [off, on] values x[0, 0, :2] placed by fixed indices
    "OneHot": ([n("Slice", ["x", "zero3", "pair_end", "axes3"], "first"), n("Reshape", ["first", "pair"], "values"),
                n("OneHot", ["hot", "depth", "values"], "o")],
               {"zero3": np.array([0, 0, 0]), "pair_end": np.array([1, 1, 2]), "axes3": np.array([0, 1, 2]),
                "pair": np.array([2]), "hot": RNG.integers(0, D, (B, S)), "depth": np.array(D)}),
    "OptionalGetElement": ([n("Optional", ["x"], "opt"), n("OptionalGetElement", ["opt"], "o")], {}),
    # θ = x[:, :2, :3], the grid [B, 4, 3, 2] read as [B, 4, 6]
    "AffineGrid": ([n("Slice", ["x", "zero2", "theta_end", "last2"], "theta"),
                    n("AffineGrid", ["theta", "size"], "grid"), n("Reshape", ["grid", "back"], "o")],
                   {"zero2": np.array([0, 0]), "theta_end": np.array([2, 3]), "last2": np.array([1, 2]),
                    "size": np.array([B, 1, S, 3]), "back": np.array([B, S, 6])}),
    # x ⊙ det(x[:, :, :4])
    "Det": ([n("Slice", ["x", "zero", "four", "last"], "square"), n("Det", ["square"], "det"),
             n("Unsqueeze", ["det", "two_axes"], "d"), n("Mul", ["x", "d"], "o")],
            {"zero": np.array([0]), "four": np.array([4]), "last": np.array([2]), "two_axes": np.array([1, 2])}),
    # the spectrum along D of x as a real signal, [B, S, D, 2] read as [B, S, 2D]
    "DFT": ([n("Unsqueeze", ["x", "last_axis"], "real"), n("DFT", ["real", "", "axis"], "f"),
             n("Reshape", ["f", "back"], "o")],
            {"last_axis": np.array([3]), "axis": np.array(2), "back": np.array([B, S, 2 * D])}),
    # x as a signal [B, 20, 1], frames of 8 every 4: [B, 4 frames, 5 bins, 2] read as [B, S, 10] (onesided
    # written out: ONNX's shape inference reads a missing one as 0, onnxruntime as the default 1)
    "STFT": ([n("Reshape", ["x", "signal_shape"], "signal"), n("STFT", ["signal", "hop", "", "width"], "f", onesided=1),
              n("Reshape", ["f", "back"], "o")],
             {"signal_shape": np.array([B, S * D, 1]), "hop": np.array(4), "width": np.array(8),
              "back": np.array([B, S, 10])}),
    # x as images [B, S, D, 1] sampled on a fixed grid [B, 3, 2, 2]: [B, S, 3, 2] read as [B, S, 6]
    "GridSample": ([n("Unsqueeze", ["x", "last_axis"], "images"), n("GridSample", ["images", "grid"], "s"),
                    n("Reshape", ["s", "back"], "o")],
                   {"last_axis": np.array([3]), "grid": const((B, 3, 2, 2), -1.1, 1.1),
                    "back": np.array([B, S, 6])}),
    # the cache x with 2·x[:, :2] written at rows 1 and 2 (batch rows 0, 1)
    "TensorScatter": ([n("Slice", ["x", "zero", "two", "one_axis"], "head"), n("Add", ["head", "head"], "update"),
                       n("TensorScatter", ["x", "update", "where"], "o", axis=1)],
                      {"zero": np.array([0]), "two": np.array([2]), "one_axis": np.array([1]),
                       "where": np.array([1, 2])}),
    "LRN": ([n("Reshape", ["x", "nchw"], "r"), n("LRN", ["r"], "l", size=3, alpha=0.3, bias=1.5),   # 4-D only
             n("Reshape", ["l", "back"], "o")], {"nchw": np.array([B, S, D, 1]), "back": np.array([B, S, D])}),
    # [B, S, D] as columns [N, C·2, L] of 2×1 blocks, C = 2, L = 5: the image [B, 2, 6, 1] read back as [B, 4, 3]
    "Col2Im": ([n("Col2Im", ["x", "image", "block"], "c"), n("Reshape", ["c", "back"], "o")],
               {"image": np.array([6, 1]), "block": np.array([2, 1]), "back": np.array([B, S, 3])}),
    "Reshape": ([n("Reshape", ["x", "shape"], "r"), n("Reshape", ["r", "back"], "o")],
                {"shape": np.array([B, S * D]), "back": np.array([B, S, D])}),
    "Flatten": ([n("Flatten", ["x"], "f", axis=2), n("Reshape", ["f", "back"], "o")], {"back": np.array([B, S, D])}),
    "Unsqueeze": ([n("Unsqueeze", ["x", "ax"], "u"), n("Squeeze", ["u", "ax"], "o")], {"ax": np.array([3])}),
    "Transpose": ([n("Transpose", ["x"], "t", perm=[0, 2, 1]), n("Transpose", ["t"], "o", perm=[0, 2, 1])], {}),
    "Concat": ([n("Concat", ["x", "c"], "o", axis=-1)], {"c": const((B, S, 2))}),
    "Split": ([n("Split", ["x", "sizes"], ["a", "o"], axis=-1)], {"sizes": np.array([2, 3])}),
    "Slice": ([n("Slice", ["x", "starts", "ends", "axes"], "o")],
              {"starts": np.array([1]), "ends": np.array([4]), "axes": np.array([2])}),
    "Gather": ([n("Gather", ["x", "idx"], "o", axis=2)], {"idx": np.array([0, 2, 2])}),
    "GatherElements": ([n("GatherElements", ["x", "idx"], "o", axis=2)], {"idx": RNG.integers(0, D, (B, S, 3))}),
    "GatherND": ([n("GatherND", ["x", "idx"], "o")], {"idx": GATHER_ND}),
    "Trilu": ([n("Trilu", ["x"], "o", upper=1)], {}),
    # (plus a residual: CP-LRP sends nothing into a softmax, and an output without relevance does not compile)
    "Softmax": ([n("Softmax", ["x"], "s", axis=-1), n("Add", ["s", "x"], "o")], {}),
    "LogSoftmax": ([n("LogSoftmax", ["x"], "o", axis=-1)], {}),
    "LayerNormalization": ([n("LayerNormalization", ["x", "scale", "bias"], "o")],
                           {"scale": const(D, 0.5, 1.5), "bias": const(D)}),
    "LpNormalization": ([n("LpNormalization", ["x"], "o", axis=-1, p=2)], {}),
    "Mod": ([n("Mod", ["x", "c"], "o", fmod=1)], {"c": const(D, 3.5, 4.0)}),    # |x| < c: no jump nearby
    "CumSum": ([n("CumSum", ["x", "axis"], "o")], {"axis": np.array(2)}),
    "Tile": ([n("Tile", ["x", "reps"], "o")], {"reps": np.array([1, 1, 2])}),
    "Pad": ([n("Pad", ["x", "pads", "c"], "o")], {"pads": np.array([0, 0, 1, 0, 0, 2]), "c": np.array(0.3)}),
    "DepthToSpace": ([n("Reshape", ["x", "nchw"], "r"), n("DepthToSpace", ["r"], "d", blocksize=2),
                      n("Reshape", ["d", "back"], "o")], {"nchw": np.array([B, S, 1, D]), "back": np.array([B, S, D])}),
    "SpaceToDepth": ([n("Slice", ["x", "zero", "four", "last"], "sl"), n("Reshape", ["sl", "nchw"], "r"),
                      n("SpaceToDepth", ["r"], "d", blocksize=2), n("Reshape", ["d", "back"], "o")],
                     {"zero": np.array([0]), "four": np.array([4]), "last": np.array([2]),
                      "nchw": np.array([B, 1, S, 4]), "back": np.array([B, S, 4])}),
    "ReverseSequence": ([n("ReverseSequence", ["x", "lens"], "o", batch_axis=0, time_axis=1)],
                        {"lens": np.array([3, 4])}),
    "CenterCropPad": ([n("CenterCropPad", ["x", "size"], "o", axes=[2])], {"size": np.array([3])}),
    "ScatterElements": ([n("ScatterElements", ["x", "idx", "c"], "o", axis=2)],
                        {"idx": np.tile(np.array([0, 3]), (B, S, 1)), "c": const((B, S, 2))}),
    "ScatterND": ([n("ScatterND", ["x", "idx", "c"], "o")], {"idx": np.array([[0, 1]]), "c": const((1, D))}),
    "TopK": ([n("TopK", ["x", "k"], ["o", "i"], axis=-1)], {"k": np.array([3])}),
    "MaxUnpool": (CHANNELS_LAST + [n("MaxPool", ["ncl"], ["m", "i"], kernel_shape=[2], strides=[2]),
                                   n("MaxUnpool", ["m", "i"], "p", kernel_shape=[2], strides=[2]), BACK], {}),
    "Compress": ([n("Compress", ["x", "keep"], "o", axis=2)], {"keep": np.array([True, False, True, True, False])}),
    "BatchNormalization": ([n("BatchNormalization", ["x", "scale", "shift", "mu", "var"], "o")],
                           {**PER_CHANNEL, "mu": const(S), "var": const(S, 0.5, 2.0)}),
    "InstanceNormalization": ([n("InstanceNormalization", ["x", "scale", "shift"], "o")], PER_CHANNEL),
    "GroupNormalization": ([n("GroupNormalization", ["x", "scale", "shift"], "o", num_groups=2)], PER_CHANNEL),
    "MeanVarianceNormalization": ([n("MeanVarianceNormalization", ["x"], "o", axes=[2])], {}),
    # a loss over [N, C, d] = [B, S, D] read back into x's shape
    "NegativeLogLikelihoodLoss": ([n("NegativeLogLikelihoodLoss", ["x", "t"], "l", reduction="none"),
                                   n("Unsqueeze", ["l", "one_axis"], "u"), n("Add", ["x", "u"], "o")],
                                  {"t": RNG.integers(0, S, (B, D)), "one_axis": np.array([1])}),
    "SoftmaxCrossEntropyLoss": ([n("SoftmaxCrossEntropyLoss", ["x", "t"], "l", reduction="none"),
                                 n("Unsqueeze", ["l", "one_axis"], "u"), n("Add", ["x", "u"], "o")],
                                {"t": RNG.integers(0, S, (B, D)), "one_axis": np.array([1])}),
})
RECIPES["ai.onnx.ml::ArrayFeatureExtractor"] = ([n("ArrayFeatureExtractor", ["x", "cols"], "o", domain="ai.onnx.ml")],
                                               {"cols": np.array([4, 0, 4, 2])})
# the opset that has the op (in the form the rule reads)
OPSET = {"Swish": 24, "GroupNormalization": 21, "TensorScatter": 24, "CumProd": 26}
# x[..., :4] ⊙ Range(start, start + 3.5, delta): start = x[0, 0, 0], delta = 1 + 0.1·tanh(x[0, 0, 1]) (always 4 values)
RECIPES["Range"] = ([n("Slice", ["x", "zero3", "pair_end", "axes3"], "first"), n("Reshape", ["first", "pair"], "two"),
                     n("Gather", ["two", "index0"], "start"), n("Gather", ["two", "index1"], "raw"),
                     n("Tanh", ["raw"], "bent"), n("Mul", ["bent", "tenth"], "small"),
                     n("Add", ["small", "one"], "delta"),
                     n("Add", ["start", "span"], "limit"), n("Range", ["start", "limit", "delta"], "ramp"),
                     n("Slice", ["x", "zero", "four", "last"], "head"), n("Mul", ["head", "ramp"], "o")],
                    {"zero3": np.array([0, 0, 0]), "pair_end": np.array([1, 1, 2]), "axes3": np.array([0, 1, 2]),
                     "pair": np.array([2]), "index0": np.array(0), "index1": np.array(1), "tenth": np.array(0.1),
                     "one": np.array(1.0), "span": np.array(3.5), "zero": np.array([0]), "four": np.array([4]),
                     "last": np.array([2])})
# the distinct values, sorted, of x + 0.01·(0, 1, 2, …) (distinct for x = 0 too), read as [B, S, D]
RECIPES["Unique"] = ([n("Add", ["x", "apart"], "spread"), n("Unique", ["spread"], "values"),
                      n("Reshape", ["values", "back"], "o")],
                     {"apart": 0.01 * np.arange(B * S * D).reshape(B, S, D), "back": np.array([B, S, D])})
RECIPES["Squeeze"] = RECIPES["Unsqueeze"]
RECIPES["Optional"] = RECIPES["OptionalGetElement"]


def model(op: str):
    nodes, inits = RECIPES[op]
    inits = {"half": np.array(0.5), **inits}
    probe = _build(nodes, inits, "o", None, OPSET.get(op, 20))
    k = ort.InferenceSession(probe.SerializeToString()).run(None, {"x": np.zeros((B, S, D), np.float32)})[0].shape[-1]
    return _build(nodes + [n("MatMul", ["o", "readout"], "y")], {**inits, "readout": const((k, CLASSES))}, "y",
                  [B, S, CLASSES], OPSET.get(op, 20))


def _build(nodes, inits, output, shape, opset=20):
    def tensor(name, value):
        value = np.asarray(value)
        dtype = np.int64 if value.dtype.kind in "iu" else (bool if value.dtype == bool else np.float32)
        return numpy_helper.from_array(value.astype(dtype), name)
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
                              [tensor(k, v) for k, v in inits.items()])
    domains = sorted({node.domain for node in nodes if node.domain})   # ai.onnx.ml's ops
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                             [helper.make_opsetid(d, {"ai.onnx.ml": 3}.get(d, 1)) for d in domains])


def finite_difference_relevance(proto, x, step=1e-3):
    """x ⊙ ∂/∂x Σ_b y[b, position_b, target_b], central differences of the original model (float64 sums)."""
    session = ort.InferenceSession(proto.SerializeToString())

    def explained(v):
        y = session.run(None, {"x": v.astype(np.float32)})[0].astype(np.float64)
        return sum(y[b, POSITION[b], TARGET[b]] for b in range(B))
    grad = np.zeros_like(x, np.float64)
    for i in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[i] += step
        down[i] -= step
        grad[i] = (explained(up) - explained(down)) / (2 * step)
    return x * grad


def test_every_op_with_a_vjp_has_a_recipe():
    from test_quantized import RECIPES as STRAIGHT_THROUGH   # quantization ops: their own oracle (tests/ on sys.path)
    assert set(RECIPES) | set(STRAIGHT_THROUGH) == set(ops.with_vjp())


@pytest.mark.parametrize("op", sorted(RECIPES))
def test_op_compiles_under_every_preset_and_gxi_is_exact(op):
    proto = model(op)
    x = RNG.normal(size=(B, S, D)).astype(np.float32)
    for preset in PRESETS:
        explainer = lrpc.Explainer(lrpc.compile(proto, preset=preset))
        relevance = explainer.explain({"x": x}, target=TARGET, position=POSITION).relevance["x"]
        assert relevance.shape == x.shape and np.all(np.isfinite(relevance)), preset
        if preset == "gxi":
            want = finite_difference_relevance(proto, x)
            assert np.abs(relevance - want).max() <= 2e-3 * max(np.abs(want).max(), 1e-3), (relevance, want)


def test_an_op_outside_the_registry_is_refused_by_name():
    proto = _build([n("Shrink", ["x"], "c", domain="lrp.test"), n("MatMul", ["c", "readout"], "y")],
                   {"readout": const((D, CLASSES))}, "y", [B, S, CLASSES])
    proto.opset_import.append(helper.make_opsetid("lrp.test", 1))
    with pytest.raises(LrpcError, match="no relevance rule for op lrp.test::Shrink"):
        lrpc.compile(proto)


@pytest.mark.parametrize("preset", PRESETS)
def test_an_onnx_op_without_a_row_is_expanded_into_its_function_body(preset):
    # Shrink has no row; its schema's function body (Where / Less / Add …) carries the relevance, the node
    # itself the forward: gxi against central differences, every preset's forward bit for bit the model's
    proto = _build([n("Shrink", ["x"], "c", lambd=0.3, bias=0.2), n("MatMul", ["c", "readout"], "y")],
                   {"readout": const((D, CLASSES))}, "y", [B, S, CLASSES])
    x = RNG.normal(size=(B, S, D)).astype(np.float32)
    result = lrpc.Explainer(lrpc.compile(proto, preset=preset)).explain({"x": x}, target=TARGET, position=POSITION)
    plain = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(result.outputs["y"], plain)
    if preset == "gxi":
        want = finite_difference_relevance(proto, x)
        np.testing.assert_allclose(result.relevance["x"], want, atol=2e-3 * np.abs(want).max())


def test_lrpc_ops_lists_the_registry():
    command = [str(Path(sys.executable).with_name("lrpc")), "ops"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    listed = {line: lines[i + 1].strip().split(", ") for i, line in enumerate(lines) if line.endswith(":")}
    exact, = (v for k, v in listed.items() if k.startswith("ops with an exact local rule"))
    assert exact == ops.with_vjp()
    fused, = (v for k, v in listed.items() if k.startswith("fused ops, kept"))
    assert fused == ops.of_kind(ops.FUSED)
    table = lines[lines.index(next(k for k in listed if k.startswith("per op"))) + 1:]
    status = {line.split()[0]: line.split()[1] for line in table}
    assert {op for op, s in status.items() if s == "rule"} == set(ops.with_vjp())
    assert status["If"] == "control" and status["Attention"] == "decomposed" and status["Mod"] == "rule"
    assert status["com.microsoft::GroupQueryAttention"] == "refused"
