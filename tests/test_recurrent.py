"""Recurrent ops (RNN, GRU, LSTM unrolled; Scan of static length unrolled) against independent oracles:
torch autograd for torch's GRU / LSTM / RNN written as ONNX nodes, and a hand-derived Scan."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc

F = TensorProto.FLOAT
T, B, I, H = 4, 2, 3, 5


def _run(model, feed, seed, preset):
    explainer = lrpc.compile(model, preset=preset, attribute=list(feed), seed="vector")
    session = ort.InferenceSession(explainer.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {**feed, "lrp_seed": seed})
    return dict(zip([o.name for o in session.get_outputs()], outs))


def _onnx_gates(w, op):
    """torch's gate order (GRU r z n, LSTM i f g o) → ONNX's (GRU z r h, LSTM i o f c)."""
    chunks = np.split(w, {"GRU": 3, "LSTM": 4, "RNN": 1}[op], axis=0)
    order = {"GRU": [1, 0, 2], "LSTM": [0, 3, 1, 2], "RNN": [0]}[op]
    return np.concatenate([chunks[k] for k in order], axis=0)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_recurrent_layer_matches_torch_autograd(op):
    """A bidirectional torch layer with initial states; R = x ⊙ ∂s/∂x for s = Σ seed ⊙ Y (Y batch first)."""
    import torch
    torch.manual_seed(0)
    layer = getattr(torch.nn, op)(I, H, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    seed = np.random.default_rng(1).uniform(0.5, 1.5, (B, T * 2 * H))
    y = layer(x, (h0, c0) if op == "LSTM" else h0)[0]                       # [T, B, 2·H]
    flat = y.reshape(T, B, 2, H).permute(1, 0, 2, 3).reshape(B, -1)        # ONNX Y [T, 2, B, H] batch first
    (flat * torch.from_numpy(seed)).sum().backward()

    params = {name: p.detach().numpy() for name, p in layer.named_parameters()}
    inits = {"W": np.stack([_onnx_gates(params[f"weight_ih_l0{s}"], op) for s in ("", "_reverse")]),
             "R": np.stack([_onnx_gates(params[f"weight_hh_l0{s}"], op) for s in ("", "_reverse")]),
             "B": np.stack([np.concatenate([_onnx_gates(params[f"bias_ih_l0{s}"], op),
                                            _onnx_gates(params[f"bias_hh_l0{s}"], op)]) for s in ("", "_reverse")])}
    inputs = ["x", "W", "R", "B", "", "h0"] + (["c0"] if op == "LSTM" else [])
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    nodes = [helper.make_node(op, inputs, ["Y"], hidden_size=H, direction="bidirectional", **extra),
             helper.make_node("Transpose", ["Y"], ["Yb"], perm=[2, 0, 1, 3]),
             helper.make_node("Reshape", ["Yb", "shape"], ["out"])]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    graph = helper.make_graph(
        nodes, "rnn", [helper.make_tensor_value_info(n, F, s) for n, s in
                       [("x", [T, B, I])] + [(n, [2, B, H]) for n in states]],
        [helper.make_tensor_value_info("out", F, [B, T * 2 * H])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()] +
        [numpy_helper.from_array(np.array([B, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    feed = {"x": x.detach().numpy().astype(np.float32), "h0": h0.detach().numpy().astype(np.float32)}
    if op == "LSTM":
        feed["c0"] = c0.detach().numpy().astype(np.float32)
    got = _run(model, feed, seed.astype(np.float32), "gxi")
    for name, tensor in (("x", x), ("h0", h0)) + ((("c0", c0),) if op == "LSTM" else ()):
        expected = (tensor * tensor.grad).detach().numpy()
        np.testing.assert_allclose(got["relevance." + name], expected, rtol=2e-4, atol=2e-5)
    attnlrp = _run(model, feed, seed.astype(np.float32), "attnlrp")
    assert all(np.isfinite(attnlrp["relevance." + name]).all() for name in feed)
    np.testing.assert_array_equal(attnlrp["out"], got["out"])   # the forward is the model's own


def test_scan_of_static_length_is_unrolled():
    # a running product over 3 steps: state ← state ⊙ x_t, y_t = state; Σ y = a x₀ + a x₀x₁ + a x₀x₁x₂ for a
    # one-element state a: ∂/∂x₀ = a(1 + x₁ + x₁x₂), ∂/∂x₁ = a x₀(1 + x₂), ∂/∂x₂ = a x₀x₁; R = x ⊙ ∂
    body = helper.make_graph([helper.make_node("Mul", ["s_in", "x_t"], ["s_out"]),
                              helper.make_node("Identity", ["s_out"], ["y_t"])], "body",
                             [helper.make_tensor_value_info("s_in", F, [1]), helper.make_tensor_value_info("x_t", F, [1])],
                             [helper.make_tensor_value_info("s_out", F, [1]), helper.make_tensor_value_info("y_t", F, [1])])
    graph = helper.make_graph([helper.make_node("Scan", ["a", "x"], ["s", "ys"], body=body, num_scan_inputs=1),
                               helper.make_node("Reshape", ["ys", "shape"], ["y"])], "scan",
                              [helper.make_tensor_value_info("a", F, [1]), helper.make_tensor_value_info("x", F, [3, 1])],
                              [helper.make_tensor_value_info("y", F, [1, 3])],
                              [numpy_helper.from_array(np.array([1, 3], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    a, (x0, x1, x2) = 2.0, (0.5, 3.0, -1.0)
    got = _run(model, {"a": np.float32([a]), "x": np.float32([[x0], [x1], [x2]])}, np.ones((1, 3), np.float32), "gxi")
    expected = [x0 * a * (1 + x1 + x1 * x2), x1 * a * x0 * (1 + x2), x2 * a * x0 * x1]
    np.testing.assert_allclose(got["relevance.x"].ravel(), expected, rtol=1e-6)
    np.testing.assert_allclose(got["relevance.a"], [a * (x0 + x0 * x1 + x0 * x1 * x2)], rtol=1e-6)


def test_a_recurrent_layer_of_run_time_length_is_refused_in_one_line():
    graph = helper.make_graph([helper.make_node("GRU", ["x", "W", "R"], ["Y"], hidden_size=2)], "gru",
                              [helper.make_tensor_value_info("x", F, ["steps", 1, 2])],
                              [helper.make_tensor_value_info("Y", F, ["steps", 1, 1, 2])],
                              [numpy_helper.from_array(np.ones((1, 6, 2), np.float32), "W"),
                               numpy_helper.from_array(np.ones((1, 6, 2), np.float32), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(lrpc.LrpcError, match=r"\(GRU\): a sequence length .* unknown at compile time") as info:
        lrpc.compile(model, preset="gxi", attribute=["x"])
    assert "\n" not in str(info.value)
