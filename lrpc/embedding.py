"""Sentence embeddings from any encoder, for similarity explanations (`lrpc explain ENCODER --text A
--similar-to B`, `lrpc.Similarity`): the encoder's ONNX graph gains its pooling and an L2 normalisation,
so its one output is the unit embedding e and ⟨e_A, e_B⟩ is the cosine similarity.

Explaining that similarity over A is then a vector-seed explanation with seed e_B (docs/design.md,
"Explainer contract"); the chain rule through the normalisation is in the graph itself (the norms pass
freezes the norm under AttnLRP, `gxi` differentiates it exactly). The pooling is written in plain ONNX ops:
mean pooling `Σ_t h_t m_t / Σ_t m_t` is linear in h (its denominator carries no relevance), CLS pooling picks
position 0, `pooler` takes the model's own pooled output (BERT's dense + tanh over [CLS]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrpc.errors import LrpcError

POOLINGS = ("mean", "cls", "pooler")
OUTPUT = "sentence_embedding"
POOLER_OUTPUT = "pooler_output"   # Hugging Face's name for the model's own pooled output
MIN_OPSET = 13                    # ReduceSum / Unsqueeze take their axes as inputs from opset 13


def default_pooling(model) -> str:
    """The pooling a sentence-transformers folder declares (modules.json → its Pooling module's config),
    else mean pooling."""
    if not isinstance(model, (str, os.PathLike)):
        return "mean"
    path = Path(model)
    folder = path if path.is_dir() else path.parent
    try:
        modules = json.loads((folder / "modules.json").read_text())
        module = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((folder / module.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return "mean"   # no sentence-transformers metadata (or unreadable): the common default
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    declared = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
    raise LrpcError(f"{folder} pools by {', '.join(declared) or 'an unknown mode'}, which lrpc does not "
                    f"reproduce: choose --pooling {'|'.join(POOLINGS)}")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise LrpcError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
    return pooling


def pooled(proto: onnx.ModelProto, pooling: str) -> onnx.ModelProto:
    """A copy of the encoder whose only output is its L2-normalised pooled embedding `sentence_embedding`
    [batch, hidden]. mean / cls pool the first output over its sequence axis (a [batch, hidden] output
    is an embedding already and is only normalised); pooler normalises the output `pooler_output`."""
    check_pooling(pooling)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
    graph = model.graph
    ranks = _output_ranks(model)
    if pooling == "pooler":
        if POOLER_OUTPUT not in ranks:
            raise LrpcError(f"--pooling pooler needs the model's output '{POOLER_OUTPUT}'; this model gives "
                            f"{', '.join(ranks)}: choose --pooling mean or cls")
        source = POOLER_OUTPUT
    else:
        source = graph.output[0].name
    rank = ranks[source]
    if rank not in (2, 3):
        raise LrpcError(f"output '{source}' is rank {rank}, not [batch, seq, hidden] or [batch, hidden]: "
                        "similarity needs an encoder's hidden states or embedding")
    dtype = next(o.type.tensor_type.elem_type for o in graph.output if o.name == source)
    names = _Names(model)
    nodes, consts = [], []

    def op(op_type, *inputs, **attrs):
        out = names.fresh(op_type.lower())
        nodes.append(helper.make_node(op_type, list(inputs), [out], name=names.fresh(op_type), **attrs))
        return out

    def const(value, np_dtype):
        name = names.fresh("const")
        consts.append(numpy_helper.from_array(np.asarray(value, np_dtype), name))
        return name

    float_np = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    vector = source
    if rank == 3 and pooling == "cls":
        vector = op("Gather", source, const(0, np.int64), axis=1)
    elif rank == 3:
        mask = next((i.name for i in graph.input if "mask" in i.name.lower()), None)
        if mask is None:   # no padding to leave out: the plain mean over the sequence
            vector = op("ReduceMean", source, const([1], np.int64), keepdims=0)
        else:
            weights = op("Unsqueeze", op("Cast", mask, to=dtype), const([-1], np.int64))
            total = op("ReduceSum", op("Mul", source, weights), const([1], np.int64), keepdims=0)
            count = op("Max", op("ReduceSum", weights, const([1], np.int64), keepdims=0), const(1e-9, float_np))
            vector = op("Div", total, count)
    # F.normalize: e = v / max(‖v‖, 1e-12)
    norm = op("Sqrt", op("ReduceSum", op("Mul", vector, vector), const([-1], np.int64), keepdims=1))
    nodes.append(helper.make_node("Div", [vector, op("Max", norm, const(1e-12, float_np))], [names.output],
                                  name=names.fresh("Div")))
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(names.output, dtype, None))
    return model


def _output_ranks(model: onnx.ModelProto) -> dict[str, int | None]:
    outputs = model.graph.output
    if any(not o.type.tensor_type.HasField("shape") for o in outputs):
        outputs = onnx.shape_inference.infer_shapes(model).graph.output
    return {o.name: len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None
            for o in outputs}


class _Names:
    """Fresh tensor / node names for the appended pooling, none of them taken in the model."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} \
            | {i.name for i in graph.input} | {i.name for i in graph.initializer}
        self.count = 0
        self.output = OUTPUT if OUTPUT not in self.taken else self.fresh(OUTPUT)
        self.taken.add(self.output)

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"pool_{hint}_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name
