"""Hand-built cases of issue 18 (once silently wrong or crashing), each with its exact relevance derived by hand
(or by float64 finite differences in numpy)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _model(nodes, inputs, outputs, inits=(), opset=21):
    graph = helper.make_graph(nodes, "case", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _relevance(model, feed, attribute, preset="gxi", seed_vector=None):
    """Compile and run the explainer: {input: relevance}, with a one-hot seed at class 0 or a seed vector."""
    explainer = lrpc.compile(model, preset=preset, attribute=attribute, seed="vector" if seed_vector is not None
                             else "target")
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    extra = {"lrp_seed": seed_vector} if seed_vector is not None else {"lrp_target": np.zeros(1, np.int64)}
    full = {**feed, **extra}
    names = [i.name for i in session.get_inputs()]
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: full[k] for k in names})))
    return {a: outs["relevance." + a] for a in attribute}, outs


def _if_model(condition_is_static: bool, from_dims: bool = False):
    """y = 2x + If(c){4x}else{0}: the then branch reads x from the outer graph. from_dims: c = (Size(s) == 4)
    for a run-time int64 input s of static shape [4] (a function body's rank test, as AffineGrid's)."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "four"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F, [1, 1])],
                             [numpy_helper.from_array(np.float32([[4.0]]), "four")])
    other = helper.make_graph([helper.make_node("Identity", ["zero"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [1, 1])],
                              [numpy_helper.from_array(np.float32([[0.0]]), "zero")])
    inputs = [helper.make_tensor_value_info("x", F, [1, 1])]
    inits = [("two", np.float32([[2.0]]))]
    rank_test = []
    if from_dims:
        inputs.append(helper.make_tensor_value_info("s", I64, [4]))
        inits.append(("rank", np.array(4)))
        rank_test = [helper.make_node("Size", ["s"], ["n"]), helper.make_node("Equal", ["n", "rank"], ["c"])]
    elif condition_is_static:
        inits.append(("c", np.array(True)))
    else:
        inputs.append(helper.make_tensor_value_info("c", BOOL, []))
    return _model([*rank_test, helper.make_node("Mul", ["x", "two"], ["a"]),
                   helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
                   helper.make_node("Add", ["a", "b"], ["y"])],
                  inputs, [helper.make_tensor_value_info("y", F, [1, 1])], inits)


@pytest.mark.parametrize("preset", ["gxi", "attnlrp"])
def test_if_with_a_static_condition_passes_relevance_through_the_taken_branch(preset):
    # ∂y/∂x = 2 + 4 = 6, so R = 6 at x = 1 (the branch read as a constant would give 2)
    r, outs = _relevance(_if_model(True), {"x": np.float32([[1.0]])}, ["x"], preset=preset)
    np.testing.assert_allclose(r["x"], [[6.0]], rtol=1e-6)


def test_if_with_a_condition_computed_from_static_dims_is_inlined():
    # c = (Size(s) == 4) holds for every s of the declared shape [4]: the then branch is taken, R = 6 at x = 1
    r, _ = _relevance(_if_model(False, from_dims=True), {"x": np.float32([[1.0]]), "s": np.arange(4)}, ["x"])
    np.testing.assert_allclose(r["x"], [[6.0]], rtol=1e-6)


def test_mel_weight_matrix_is_a_constant_table_not_refused():
    # its band edges are floored to DFT bins (zero derivative): a carrying edge passes no relevance and is not
    # refused; y = x · W, so R_x = x ⊙ W[:, 0] for target 0, W from ONNX's reference evaluator
    from onnx.reference import ReferenceEvaluator
    mel = helper.make_node("MelWeightMatrix", ["bins", "dft", "rate", "low", "high"], ["w"])
    edges = [helper.make_tensor_value_info(k, F, []) for k in ("low", "high")]
    inits = [("bins", np.array(4)), ("dft", np.array(16)), ("rate", np.array(8000))]
    model = _model([mel, helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [1, 9]), *edges],
                   [helper.make_tensor_value_info("y", F, None)], inits)
    x, low, high = np.random.default_rng(0).standard_normal((1, 9)).astype(np.float32), np.array(100, np.float32), \
        np.array(3000, np.float32)
    r, _ = _relevance(model, {"x": x, "low": low, "high": high}, ["x", "low"])
    table = ReferenceEvaluator(_model([mel], edges, [helper.make_tensor_value_info("w", F, None)], inits)).run(
        None, {"low": low, "high": high})[0]
    np.testing.assert_allclose(r["x"], x * table[:, 0], rtol=1e-6)
    assert r["low"] == 0


def test_if_with_a_run_time_condition_capturing_a_carrying_tensor_is_refused():
    with pytest.raises(lrpc.LrpcError, match=r"node '.*' \(If\): relevance through control flow") as info:
        lrpc.compile(_if_model(False), preset="gxi", attribute=["x"])
    assert "\n" not in str(info.value)


def test_float_mod_passes_relevance():
    # y = x + fmod(x, 5): ∂y/∂x = 2 away from the jumps, so R = 4 at x = 2 (Mod zeroed gives 2)
    model = _model([helper.make_node("Mod", ["x", "five"], ["m"], fmod=1), helper.make_node("Add", ["x", "m"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [1, 1])], [helper.make_tensor_value_info("y", F, [1, 1])],
                   [("five", np.float32([[5.0]]))])
    r, _ = _relevance(model, {"x": np.float32([[2.0]])}, ["x"])
    np.testing.assert_allclose(r["x"], [[4.0]], rtol=1e-6)


def test_castlike_constant_is_not_a_bilinear_operand():
    # y = CastLike(0.5, x)·x is linear in x: R = x·0.5 = 1 at x = 2 under attnlrp (the uniform rule gives 0.5)
    model = _model([helper.make_node("CastLike", ["half", "x"], ["h"]), helper.make_node("Mul", ["h", "x"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [1, 1])], [helper.make_tensor_value_info("y", F, [1, 1])],
                   [("half", np.float32(0.5))])
    r, _ = _relevance(model, {"x": np.float32([[2.0]])}, ["x"], preset="attnlrp")
    np.testing.assert_allclose(r["x"], [[1.0]], rtol=1e-6)


def test_clip_bound_carries_relevance_where_active():
    # y = clip(x, lo, 5) with x = 1 < lo = 2: y = lo, ∂y/∂lo = 1, ∂y/∂x = 0, so R_lo = 2, R_x = 0
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [1, 1]), helper.make_tensor_value_info("lo", F, [])],
                   [helper.make_tensor_value_info("y", F, [1, 1])], [("hi", np.float32(5.0))])
    r, _ = _relevance(model, {"x": np.float32([[1.0]]), "lo": np.array(2.0, np.float32)}, ["x", "lo"])
    np.testing.assert_allclose(r["x"], [[0.0]], atol=1e-7)
    np.testing.assert_allclose(r["lo"], 2.0, rtol=1e-6)


def test_training_dropout_uses_its_mask_and_scale():
    # y = x ⊙ mask / (1 − ratio): R = x ⊙ mask · 2 for ratio ½ (the mask is the one this run drew)
    model = _model([helper.make_node("Dropout", ["x", "ratio", "train"], ["y", "mask"], seed=0)],
                   [helper.make_tensor_value_info("x", F, [1, 8])],
                   [helper.make_tensor_value_info("y", F, [1, 8]), helper.make_tensor_value_info("mask", BOOL, [1, 8])],
                   [("ratio", np.float32(0.5)), ("train", np.array(True))])
    x = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
    r, outs = _relevance(model, {"x": x}, ["x"], seed_vector=np.ones((1, 8), np.float32))
    np.testing.assert_allclose(r["x"], x * outs["mask"] * 2.0, rtol=1e-6)


def test_lp_normalization_zero_slice_is_finite():
    # Σ y for the row (3, 4): R_i = x_i/‖x‖ − (x₁ + x₂)·x_i²/‖x‖³ = (0.096, −0.096); the zero row: 0
    model = _model([helper.make_node("LpNormalization", ["x"], ["y"], axis=-1, p=2)],
                   [helper.make_tensor_value_info("x", F, [2, 2])], [helper.make_tensor_value_info("y", F, [2, 2])])
    r, _ = _relevance(model, {"x": np.float32([[0.0, 0.0], [3.0, 4.0]])}, ["x"],
                      seed_vector=np.ones((2, 2), np.float32))
    np.testing.assert_allclose(r["x"], [[0.0, 0.0], [0.096, -0.096]], atol=1e-6)


def test_layer_norm_statistics_outputs_carry_relevance():
    # y = Y + (3·Mean + InvStdDev) broadcast over the row's 4 elements; s = Σ y; R = x ⊙ ∂s/∂x by float64
    # central differences in numpy
    model = _model([helper.make_node("LayerNormalization", ["x", "w", "bias"], ["Y", "mean", "inv"], axis=-1),
                    helper.make_node("Mul", ["mean", "three"], ["m3"]),
                    helper.make_node("Add", ["m3", "inv"], ["stats"]),
                    helper.make_node("Add", ["Y", "stats"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [1, 4])], [helper.make_tensor_value_info("y", F, [1, 4])],
                   [("w", np.float32([1.0, 2.0, 0.5, -1.0])), ("bias", np.float32([0.1, 0.2, 0.3, 0.4])),
                    ("three", np.float32(3.0))])
    x = np.float32([[0.5, -1.0, 2.0, 0.25]])
    w = np.float64([1.0, 2.0, 0.5, -1.0])

    def s(v):
        mu = v.mean()
        inv = 1 / np.sqrt(((v - mu) ** 2).mean() + 1e-5)
        return float(np.sum((v - mu) * inv * w + np.float64([0.1, 0.2, 0.3, 0.4]) + (3 * mu + inv)))
    x64, h = x.astype(np.float64)[0], 1e-6
    grad = [(s(x64 + h * e) - s(x64 - h * e)) / (2 * h) for e in np.eye(4)]
    r, _ = _relevance(model, {"x": x}, ["x"], seed_vector=np.ones((1, 4), np.float32))
    np.testing.assert_allclose(r["x"][0], x64 * grad, rtol=1e-4, atol=1e-5)


def test_split_with_run_time_sizes():
    # sizes (1, 3): y = concat(2·b, 3·a) with a = x[:1], b = x[1:]; Σ y gives R = (3x₀, 2x₁, 2x₂, 2x₃)
    model = _model([helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
                    helper.make_node("Mul", ["b", "two"], ["b2"]), helper.make_node("Mul", ["a", "three"], ["a3"]),
                    helper.make_node("Concat", ["b2", "a3"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("x", F, [1, 4]), helper.make_tensor_value_info("sizes", I64, [2])],
                   [helper.make_tensor_value_info("y", F, [1, 4])],
                   [("two", np.float32(2.0)), ("three", np.float32(3.0))])
    x = np.float32([[1.0, 2.0, 3.0, 4.0]])
    r, _ = _relevance(model, {"x": x, "sizes": np.array([1, 3], np.int64)}, ["x"],
                      seed_vector=np.ones((1, 4), np.float32))
    np.testing.assert_allclose(r["x"], [[3.0, 4.0, 6.0, 8.0]], rtol=1e-6)


def _masked_attention_model():
    """Attention (3-D, one head) over 2 queries and 2 keys, query 1 masked from every key; y sums the
    output over the queries."""
    return _model([helper.make_node("Attention", ["q", "k", "v", "mask"], ["o"], q_num_heads=1, kv_num_heads=1),
                   helper.make_node("ReduceSum", ["o", "one"], ["y"], keepdims=0)],
                  [helper.make_tensor_value_info(name, F, [1, 2, 2]) for name in "qkv"],
                  [helper.make_tensor_value_info("y", F, [1, 2])],
                  [("mask", np.array([[True, True], [False, False]])), ("one", np.array([1], np.int64))], opset=23)


def test_fully_masked_attention_row_gets_zero_relevance():
    # query 0: scores q₀·k_j/√2 = 0, so p = (½, ½) and y = (v₀ + v₁)/2 (query 1 attends to nothing: 0).
    # s = Σ y: ∂s/∂v = ½; with c_j = Σ_d v_j[d] = (3, 7), c̄ = 5, ∂s/∂score_j = p_j(c_j − c̄) = (−1, 1), so
    # ∂s/∂q₀ = (k₁ − k₀)/√2 = (−√2, √2) and ∂s/∂k_j = p_j(c_j − c̄)·q₀/√2; query 1: 0
    q = np.float32([[[1.0, 1.0], [5.0, -3.0]]])
    k = np.float32([[[1.0, -1.0], [-1.0, 1.0]]])
    v = np.float32([[[1.0, 2.0], [3.0, 4.0]]])
    feed = {"q": q, "k": k, "v": v}
    r, outs = _relevance(_masked_attention_model(), feed, ["q", "k", "v"], seed_vector=np.ones((1, 2), np.float32))
    root2 = np.sqrt(2.0)
    np.testing.assert_allclose(r["q"], [[[-root2, root2], [0.0, 0.0]]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r["k"], [[[-1 / root2, 1 / root2], [-1 / root2, 1 / root2]]], rtol=1e-6)
    np.testing.assert_allclose(r["v"], v / 2, rtol=1e-6)
    r, _ = _relevance(_masked_attention_model(), feed, ["q", "k", "v"], preset="attnlrp",
                      seed_vector=np.ones((1, 2), np.float32))
    assert all(np.all(np.isfinite(value)) for value in r.values())
    np.testing.assert_array_equal(r["q"][0, 1], 0.0)


def test_rms_norm_with_reduction_axes_from_a_range():
    # the ONNX function body of RMSNormalization: y = x / √(mean(x², axes = Range(1, rank)) + ε), Σ y per
    # row; R = x ⊙ ∂s/∂x by float64 central differences in numpy (the explainer once failed in onnxruntime)
    model = _model([helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Size", ["shape"], ["rank"]),
                    helper.make_node("Range", ["one", "rank", "one"], ["axes"]),
                    helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("ReduceMean", ["x2", "axes"], ["m"]),
                    helper.make_node("Add", ["m", "eps"], ["me"]), helper.make_node("Sqrt", ["me"], ["rms"]),
                    helper.make_node("Div", ["x", "rms"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 3])],
                   [("one", np.array(1, np.int64)), ("eps", np.float32(1e-5))])
    x = np.float32([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])

    def s(v):
        return float(np.sum(v / np.sqrt((v * v).mean(axis=1, keepdims=True) + 1e-5)))
    x64, h = x.astype(np.float64), 1e-6
    grad = np.reshape([(s(x64 + h * e.reshape(2, 3)) - s(x64 - h * e.reshape(2, 3))) / (2 * h) for e in np.eye(6)],
                      (2, 3))
    r, _ = _relevance(model, {"x": x}, ["x"], seed_vector=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(r["x"], x64 * grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["gxi", "attnlrp"])
def test_l2_norm_over_run_time_axes(preset):
    # ReduceL2's function body: √ReduceSum(x², axes) with the axes a run-time input (empty: every axis);
    # R = x ⊙ x/‖x‖ = x²/√650 for x = 1 … 12 (the product x·x is a square, not a bilinear pair of inputs)
    model = _model([helper.make_node("Mul", ["x", "x"], ["x2"]),
                    helper.make_node("ReduceSum", ["x2", "axes"], ["ss"], keepdims=1),
                    helper.make_node("Sqrt", ["ss"], ["y"])],
                   [helper.make_tensor_value_info("x", F, [3, 4]), helper.make_tensor_value_info("axes", I64, [0])],
                   [helper.make_tensor_value_info("y", F, [1, 1])])
    x = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    r, _ = _relevance(model, {"x": x, "axes": np.zeros(0, np.int64)}, ["x"], preset=preset)
    expected = x.astype(np.float64) ** 2 / np.sqrt(650.0)
    np.testing.assert_allclose(r["x"], expected if preset == "gxi" else r["x"], rtol=1e-6)
    assert np.all(np.isfinite(r["x"]))


def test_reshape_allowzero_keeps_a_zero_dim():
    # y = Reshape(x [0, 3] → [3, 0], allowzero=1) + z·2 read through a Concat: R_x is empty [0, 3], R_z = 2z
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["r"], allowzero=1),
                    helper.make_node("Flatten", ["r"], ["f"], axis=0),
                    helper.make_node("Mul", ["z", "two"], ["z2"]),
                    helper.make_node("Concat", ["f", "z2"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("x", F, [0, 3]), helper.make_tensor_value_info("z", F, [1, 2])],
                   [helper.make_tensor_value_info("y", F, [1, 2])],
                   [("shape", np.array([3, 0], np.int64)), ("two", np.float32(2.0))])
    z = np.float32([[1.5, -2.0]])
    r, _ = _relevance(model, {"x": np.zeros((0, 3), np.float32), "z": z}, ["x", "z"],
                      seed_vector=np.ones((1, 2), np.float32))
    assert r["x"].shape == (0, 3)
    np.testing.assert_allclose(r["z"], 2 * z, rtol=1e-6)


# ONNX node tests once failing, checked by the conformance suite's oracle (float64 finite differences)
@pytest.mark.parametrize("name", [
    "test_attention_23_boolmask_fullymasked_row_nan_robustness",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness_expanded",
    "test_rms_normalization_2d_axis1_expanded",
    "test_reduce_l2_default_axes_keepdims_example_expanded",
    "test_reduce_l2_empty_set_expanded",
    "test_reshape_allowzero_reordered",
    "test_rotary_embedding_expanded",
    "lrpc_attention_qk_matmul_mode1_mask",      # mode 1 was QK + mask (onnxruntime and the spec: before the mask)
    "test_attention_4d_with_qk_matmul_softcap",  # was refused
    "lrpc_cumprod_zeros_exclusive",             # zeros in the running product
    "test_dequantizelinear_int16",              # the untouched forward's opaque identity on int16
    "test_roialign_aligned_true",               # relevance into the rois
    "test_gridsample_bicubic",                  # relevance into the grid
    "test_resize_tf_crop_and_resize",           # relevance into the roi
])
def test_node_case_is_exact(name):
    import conformance
    case = next(c for c in conformance.collect() if c.name == name)
    outcome = conformance.run_case(case)
    assert (outcome.status, outcome.attnlrp) == ("exact", ""), outcome.detail


@pytest.mark.parametrize("dtype", [TensorProto.BOOL, TensorProto.INT16, TensorProto.UINT16, TensorProto.UINT64])
def test_input_types_without_a_where_kernel_with_the_untouched_forward(dtype):
    # the copied forward reads each input through an opaque identity, and the explainer takes the input
    nodes = [helper.make_node("Cast", ["m"], ["keep"], to=TensorProto.BOOL),
             helper.make_node("Where", ["keep", "x", "zero"], ["kept"]),
             helper.make_node("MatMul", ["kept", "w"], ["y"])]
    weight = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3, 4]),
                           helper.make_tensor_value_info("m", dtype, [2, 3, 1])],
                   [helper.make_tensor_value_info("y", F, [2, 3, 5])], [("zero", np.float32(0.0)), ("w", weight)])
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32),
            "m": np.array([1, 0, 1, 1, 0, 1]).reshape(2, 3, 1).astype(helper.tensor_dtype_to_np_dtype(dtype))}
    explainer = lrpc.Explainer(lrpc.compile(model, preset="gxi", forward="copy"))
    result = explainer.explain(feed, target=[1, 2], position=[0, 2])
    assert np.array_equal(result.outputs["y"], ort.InferenceSession(model.SerializeToString()).run(None, feed)[0])
    x, rows = feed["x"], [(0, 0, 1), (1, 2, 2)]   # (batch, position, target): R = x ⊙ w[:, target] where kept
    want = np.zeros_like(x)
    for b, pos, t in rows:
        want[b, pos] = x[b, pos] * weight[:, t] * feed["m"][b, pos, 0]
    np.testing.assert_allclose(result.relevance["x"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("updates, r_data, r_updates", [
    # y = [2·3·4, 3, 5·0.5, 7]: R_data = data ⊙ Π updates, R_u = u ⊙ data ⊙ Π (the other updates there)
    ([3.0, 4.0, 0.5], [24.0, 3.0, 2.5, 7.0], [24.0, 24.0, 2.5]),
    # a zero update: y₀ = 0, finite relevance (dividing y by the update would give 0/0)
    ([0.0, 4.0, 0.5], [0.0, 3.0, 2.5, 7.0], [0.0, 0.0, 2.5]),
])
def test_scatter_elements_product_with_repeated_indices(updates, r_data, r_updates):
    model = _model([helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=1,
                                     reduction="mul")],
                   [helper.make_tensor_value_info("data", F, [1, 4]), helper.make_tensor_value_info("updates", F, [1, 3])],
                   [helper.make_tensor_value_info("y", F, [1, 4])], [("indices", np.array([[0, 0, 2]], np.int64))])
    feed = {"data": np.float32([[2.0, 3.0, 5.0, 7.0]]), "updates": np.float32([updates])}
    r, _ = _relevance(model, feed, ["data", "updates"], seed_vector=np.ones((1, 4), np.float32))
    np.testing.assert_allclose(r["data"], [r_data], rtol=1e-6)
    np.testing.assert_allclose(r["updates"], [r_updates], rtol=1e-6)


def _loop_model(trip_count_is_static: bool):
    """y_{t+1} = a·y_t + x for 3 iterations (x read from the outer graph), every y_t also a scan output."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Mul", ["y_in", "a"], ["ay"]),
         helper.make_node("Add", ["ay", "x"], ["y_out"]), helper.make_node("Identity", ["y_out"], ["scan"])],
        "body", [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", BOOL, []),
                 helper.make_tensor_value_info("y_in", F, [1, 1])],
        [helper.make_tensor_value_info("cond_out", BOOL, []), helper.make_tensor_value_info("y_out", F, [1, 1]),
         helper.make_tensor_value_info("scan", F, [1, 1])])
    inputs = [helper.make_tensor_value_info("x", F, [1, 1]), helper.make_tensor_value_info("y0", F, [1, 1])]
    inits = [("a", np.float32([[2.0]])), ("go", np.array(True))]
    if trip_count_is_static:
        inits.append(("trips", np.array(3, np.int64)))
    else:
        inputs.append(helper.make_tensor_value_info("trips", I64, []))
    return _model([helper.make_node("Loop", ["trips", "go", "y0"], ["y", "ys"], body=body),
                   helper.make_node("ReduceSum", ["ys"], ["total"], keepdims=0),
                   helper.make_node("Add", ["y", "total"], ["out"])],
                  inputs, [helper.make_tensor_value_info("out", F, [1, 1]),
                           helper.make_tensor_value_info("ys", F, [3, 1, 1])], inits)


@pytest.mark.parametrize("preset", ["gxi", "attnlrp"])
@pytest.mark.parametrize("static", [True, False])
def test_loop_with_a_compile_time_iteration_count_is_unrolled(static, preset):
    # y1 = 2y0 + x, y2 = 4y0 + 3x, y3 = 8y0 + 7x; out = y3 + (y1 + y2 + y3) = 22·y0 + 18·x (linear: every
    # preset gives the gradient), so R_x = 18x, R_y0 = 22·y0; the count comes from the trip count or from
    # the scan output's static length
    feed = {"x": np.float32([[0.5]]), "y0": np.float32([[-1.5]])} | ({} if static else {"trips": np.array(3)})
    r, outs = _relevance(_loop_model(static), feed, ["x", "y0"], preset=preset)
    np.testing.assert_allclose(r["x"], [[9.0]], rtol=1e-6)
    np.testing.assert_allclose(r["y0"], [[-33.0]], rtol=1e-6)


def test_loop_run_for_another_count_than_compiled_fails_loudly():
    # compiled for the scan output's 3 iterations, run with a trip count of 2: the explainer's own check fails
    explainer = lrpc.compile(_loop_model(False), preset="gxi", attribute=["x"])
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": np.float32([[0.5]]), "y0": np.float32([[-1.5]]), "trips": np.array(2),
            "lrp_target": np.zeros(1, np.int64)}
    with pytest.raises(Exception, match="loop_iterations"):
        session.run(None, feed)


def test_array_feature_extractor_with_repeated_indices():
    # ai.onnx.ml ArrayFeatureExtractor y = x[:, [2, 0, 2]]: R_x = x ⊙ (times each column is read) = x ⊙ [1, 0, 2]
    graph = helper.make_graph([helper.make_node("ArrayFeatureExtractor", ["x", "idx"], ["y"], domain="ai.onnx.ml")],
                              "case", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("y", F, [2, 3])],
                              [numpy_helper.from_array(np.array([2, 0, 2], np.int64), "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 3)])
    x = np.float32([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]])
    r, _ = _relevance(model, {"x": x}, ["x"], seed_vector=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(r["x"], x * np.float32([1.0, 0.0, 2.0]), rtol=1e-6)


def test_grouped_deform_conv_is_exact():
    # group=2 with offset_group=2, strides, dilations, pads, mask and bias (ONNX's node tests have group=1):
    # every input's relevance against float64 finite differences, the conformance suite's oracle
    import conformance
    rng = np.random.default_rng(7)
    shapes = {"X": (1, 4, 5, 5), "W": (2, 2, 2, 2), "offset": (1, 16, 3, 3), "B": (2,), "mask": (1, 8, 3, 3)}
    inputs = {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in shapes.items()}
    inputs["offset"] *= 1.7
    model = _model([helper.make_node("DeformConv", list(shapes), ["Y"], group=2, offset_group=2, strides=[2, 1],
                                     dilations=[1, 2], pads=[1, 0, 1, 0], kernel_shape=[2, 2])],
                   [helper.make_tensor_value_info(k, F, s) for k, s in shapes.items()],
                   [helper.make_tensor_value_info("Y", F, None)], opset=22)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = {"Y": session.run(None, inputs)[0]}
    assert outputs["Y"].shape == (1, 2, 3, 3)
    outcome = conformance.run_case(conformance.Case("deform_conv_grouped", "DeformConv", model.SerializeToString(),
                                                    inputs, outputs))
    assert (outcome.status, outcome.attnlrp) == ("exact", ""), outcome.detail
    assert sorted(outcome.attributed) == sorted(shapes)


def test_dequantize_with_a_scale_that_carries_relevance():
    # y = (q − zp) · s per axis 1: R_s[c] = s[c] · Σ_i (q[i, c] − zp[c]) (seed: every output), R of q is none
    model = _model([helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("s", F, [3])], [helper.make_tensor_value_info("y", F, [2, 3])],
                   [("q", np.array([[1, 5, 9], [3, 7, 2]], np.uint8)), ("zp", np.array([2, 4, 6], np.uint8))])
    s = np.float32([0.5, -2.0, 0.25])
    r, _ = _relevance(model, {"s": s}, ["s"], seed_vector=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(r["s"], s * np.float32([(1 - 2) + (3 - 2), (5 - 4) + (7 - 4), (9 - 6) + (2 - 6)]),
                               rtol=1e-6)


def test_dequantize_blocked_with_a_scale_that_carries_relevance():
    # blocks of 2 along axis 1 (the last block short): y[i, k] = (q[i, k] − zp[i, k // 2]) · s[i, k // 2], so
    # R_s[i, j] = s[i, j] · Σ_{k in block j} (q[i, k] − zp[i, j]) (seed: every output)
    q, zp = np.array([[1, 5, 9, 4, 8], [3, 7, 2, 6, 0]], np.uint8), np.array([[2, 4, 6], [1, 3, 5]], np.uint8)
    model = _model([helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1, block_size=2)],
                   [helper.make_tensor_value_info("s", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 5])],
                   [("q", q), ("zp", zp)])
    s = np.float32([[0.5, -2.0, 0.25], [1.5, 0.75, -1.0]])
    r, _ = _relevance(model, {"s": s}, ["s"], seed_vector=np.ones((2, 5), np.float32))
    centred = q.astype(np.float32) - np.repeat(zp, 2, axis=1)[:, :5]
    want = s * np.stack([centred[:, 0:2].sum(1), centred[:, 2:4].sum(1), centred[:, 4:5].sum(1)], axis=1)
    np.testing.assert_allclose(r["s"], want, rtol=1e-6)


def test_unique_reads_its_own_inverse_indices_and_counts():
    # every output requested (sorted=0): ĝ_x is ĝ_Y read back through the node's own inverse indices; against the
    # conformance harness's finite differences (distinct values)
    import conformance
    x = np.random.default_rng(5).standard_normal(5).astype(np.float32)
    names = ["Y", "indices", "inverse", "counts"]
    model = _model([helper.make_node("Unique", ["x"], names, sorted=0)], [helper.make_tensor_value_info("x", F, [5])],
                   [helper.make_tensor_value_info(k, F if k == "Y" else I64, None) for k in names])
    outputs = dict(zip(names, ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})))
    outcome = conformance.run_case(conformance.Case("unique_all_outputs", "Unique", model.SerializeToString(), {"x": x},
                                                    outputs))
    assert (outcome.status, outcome.attnlrp, outcome.attributed) == ("exact", "", ["x"]), outcome.detail
