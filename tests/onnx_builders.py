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


def mean_pool_model(vocab=128, hidden=6, classes=5, seed=0, token_types=False) -> onnx.ModelProto:
    """ids [batch, seq] → embedding E (+ T[token_type_ids]) → mean over the sequence → W → [batch, classes].
    No attention mask: padding would change the mean. Linear, so the relevance of token t for class c is
    exactly E[id_t]·W[:, c] / T (and T[type_t]·W[:, c] / T for its token type)."""
    rng = np.random.default_rng(seed)
    inits = {"E": rng.normal(size=(vocab, hidden)), "W": rng.normal(size=(hidden, classes))}
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"])]
    if token_types:
        inits["T"] = rng.normal(size=(2, hidden))
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]))
        nodes += [helper.make_node("Gather", ["T", "token_type_ids"], ["types"]),
                  helper.make_node("Add", ["emb", "types"], ["summed"])]
    nodes += [helper.make_node("ReduceMean", [nodes[-1].output[0], "axes"], ["pooled"], keepdims=0),
              helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mean_pool", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def masked_attention_model(hidden=8, heads=2, classes=5, seed=0, opset=18) -> onnx.ModelProto:
    """x [batch, seq, hidden] and an additive mask [batch, 1, seq, seq] → one self-attention layer
    softmax(Q Kᵀ·scale + mask) V → W_o → [batch, seq, classes]: the mask is the model's input, so a test
    can feed causal, padded and bidirectional masks to the same explainer."""
    rng = np.random.default_rng(seed)
    d = hidden // heads
    inits = {name: rng.normal(size=(hidden, hidden)) * 0.5 for name in ("Wq", "Wk", "Wv")}
    inits["Wo"] = rng.normal(size=(hidden, classes))
    consts = [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in
              {"split_heads": [0, 0, heads, d], "merge_heads": [0, 0, hidden]}.items()]
    consts.append(numpy_helper.from_array(np.asarray(d ** -0.5, np.float32), "scale"))
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", "split_heads"], [f"{name}_split"]),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"],
                                   perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["q_heads", "k_heads"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
              helper.make_node("MatMul", ["weights", "v_heads"], ["mixed"]),
              helper.make_node("Transpose", ["mixed"], ["mixed_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["mixed_t", "merge_heads"], ["merged"]),
              helper.make_node("MatMul", ["merged", "Wo"], ["logits"])]
    graph = helper.make_graph(
        nodes, "masked_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", classes])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()] + consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def all_nodes(graph: onnx.GraphProto):
    """Every node of the graph and of its subgraphs (If / Loop / Scan bodies; an explainer with causal
    blocks holds its two graphs as the branches of one If)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                yield from all_nodes(sub)
