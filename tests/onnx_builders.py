"""Tiny ONNX models built with onnx.helper (no torch), shared by the CLI, contract and loading tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def token_model(vocab=20, hidden=8, classes=4, seed=0, opset=18, output_name="logits") -> onnx.ModelProto:
    """ids [batch, seq] → embedding → tanh(x W1) ⊙ (x W2) → W3 → [batch, seq, classes]."""
    rng = np.random.default_rng(seed)
    inits = {"E": rng.normal(size=(vocab, hidden)), "W1": rng.normal(size=(hidden, hidden)),
             "W2": rng.normal(size=(hidden, hidden)), "W3": rng.normal(size=(hidden, classes)),
             "b3": rng.normal(size=(classes,))}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("MatMul", ["emb", "W1"], ["h1"]), helper.make_node("Tanh", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["emb", "W2"], ["h2"]), helper.make_node("Mul", ["a1", "h2"], ["g"]),
             helper.make_node("MatMul", ["g", "W3"], ["z"]), helper.make_node("Add", ["z", "b3"], [output_name])]
    graph = helper.make_graph(
        nodes, "token_model",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", "seq", classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def float_model(features=6, classes=3, seed=0, opset=18) -> onnx.ModelProto:
    """x [batch, features] → relu(x W1 + b1) W2 → [batch, classes]."""
    rng = np.random.default_rng(seed)
    inits = {"W1": rng.normal(size=(features, 5)), "b1": rng.normal(size=(5,)), "W2": rng.normal(size=(5, classes))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "float_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
