"""The explainer contract to the letter (docs/design.md, "Explainer contract"), checked with plain onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from onnx_builders import float_model, token_model


def session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_rank3_contract_inputs_outputs_and_dynamic_axes():
    model = token_model()
    proto = lrpc.compile(model, preset="gxi")
    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == ["input_ids", "lrp_target", "lrp_position"]
    assert inputs["lrp_target"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(inputs["lrp_target"]) == ["batch"] and dims(inputs["lrp_position"]) == ["batch"]
    outputs = [o.name for o in proto.graph.output]
    assert outputs == ["logits", "relevance.input_ids"]
    assert dims(proto.graph.output[1]) == ["batch", "seq"]
    assert proto.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    original = session(model)
    explainer = session(proto)
    for batch, seq in ((1, 3), (3, 8)):
        ids = np.random.default_rng(batch).integers(0, 20, (batch, seq))
        target = np.arange(batch, dtype=np.int64) % 4
        position = -np.ones(batch, np.int64)
        logits, relevance = explainer.run(None, {"input_ids": ids, "lrp_target": target, "lrp_position": position})
        assert np.allclose(logits, original.run(None, {"input_ids": ids})[0], atol=1e-6)
        assert relevance.shape == (batch, seq)
        # the same through the Explainer API, position −1 ≡ seq − 1
        res = lrpc.Explainer(proto).explain({"input_ids": ids}, target=target, position=np.full(batch, seq - 1))
        assert np.allclose(res.relevance["input_ids"], relevance, atol=1e-6)


def test_rank2_contract_has_no_position():
    proto = lrpc.compile(float_model(), preset="gxi")
    assert [i.name for i in proto.graph.input] == ["x", "lrp_target"]
    assert [o.name for o in proto.graph.output] == ["y", "relevance.x"]
    assert dims(proto.graph.output[1]) == ["batch", 6]


def test_vector_seed_contract():
    proto = lrpc.compile(token_model(), preset="gxi", seed="vector")
    inputs = {i.name: dims(i) for i in proto.graph.input}
    assert inputs == {"input_ids": ["batch", "seq"], "lrp_seed": ["batch", 4], "lrp_position": ["batch"]}


def test_batch_rows_are_independent():
    proto = lrpc.compile(token_model())
    ex = lrpc.Explainer(proto)
    ids = np.random.default_rng(0).integers(0, 20, (3, 5))
    together = ex.explain({"input_ids": ids}, target=[0, 1, 2], position=[4, 2, 0]).relevance["input_ids"]
    for row, (t, p) in enumerate(zip([0, 1, 2], [4, 2, 0])):
        alone = ex.explain({"input_ids": ids[row:row + 1]}, target=[t], position=[p]).relevance["input_ids"]
        assert np.allclose(alone[0], together[row], atol=1e-6)


@pytest.mark.parametrize("kwargs,words", [
    ({"target": [4], "position": [0]}, "target"),
    ({"target": [-1], "position": [0]}, "target"),
    ({"target": [0], "position": [5]}, "position"),
    ({"target": [0], "position": [-6]}, "position"),
    ({"target": [0, 1], "position": [0]}, "batch"),
])
def test_target_and_position_are_checked_before_running(kwargs, words):
    ex = lrpc.Explainer(lrpc.compile(token_model()))
    with pytest.raises(lrpc.LrpcError) as info:
        ex.explain({"input_ids": np.zeros((1, 5), np.int64)}, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_predicted_target_by_default():
    ex = lrpc.Explainer(lrpc.compile(float_model()))
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    res = ex.explain({"x": x})
    assert np.array_equal(res.target, res.outputs["y"].argmax(-1))
    assert np.allclose(res.logit, res.outputs["y"].max(-1))


def test_explained_output_and_attribution_options():
    model = token_model()
    with pytest.raises(lrpc.LrpcError, match="no output of that name"):
        lrpc.compile(model, output_name="nope")
    with pytest.raises(lrpc.LrpcError, match="unknown input"):
        lrpc.compile(model, attribute=["nope"])
