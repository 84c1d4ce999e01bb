"""Dynamic axes of exported models: which input axes are `batch` / `sequence`, the matching output axes, and
renaming the exporters' symbolic dims to those names (lrpc/torch_export.py uses these)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import onnx

BATCH_DIM = "batch"
SEQ_DIM = "sequence"
#: an encoder–decoder model's target side: inputs named ``decoder_*`` (Hugging Face's names) and the outputs
#: that follow their length get their own dynamic axis, independent of the source ``sequence``
DECODER_PREFIX = "decoder_"
DECODER_SEQ_DIM = "decoder_sequence"


def token_length(example_inputs: Mapping[str, Any], *, decoder: bool = False) -> int | None:
    """The token length of the source inputs (or, with `decoder`, of the ``decoder_*`` inputs)."""
    import torch

    for name, t in example_inputs.items():
        if name.startswith(DECODER_PREFIX) != decoder:
            continue
        if t.dtype in (torch.int32, torch.int64) and t.dim() >= 2:
            return int(t.shape[1])
    return None


def dynamic_axes_for(example_inputs: Mapping[str, Any], dynamic: bool) -> dict[str, dict[int, str]]:
    """{input name: {axis: dim name}}: batch everywhere, sequence on token-shaped inputs."""
    import torch

    if not dynamic:
        return {}
    axes: dict[str, dict[int, str]] = {}
    for name, t in example_inputs.items():
        decoder = name.startswith(DECODER_PREFIX)
        seq = token_length(example_inputs, decoder=decoder)
        a: dict[int, str] = {}
        if t.dim() >= 1:
            a[0] = BATCH_DIM
        is_token_like = t.dim() == 2 and (
            t.dtype in (torch.int32, torch.int64, torch.bool) or (seq is not None and t.shape[1] == seq)
        )
        if is_token_like and t.dim() >= 2:
            a[1] = DECODER_SEQ_DIM if decoder else SEQ_DIM
        axes[name] = a
    return axes


def output_axes(outputs: Sequence[Any], example_inputs: Mapping[str, Any], axes_in) -> list[dict[int, str]]:
    batch = next(iter(example_inputs.values())).shape[0] if example_inputs else None
    seq = token_length(example_inputs)
    decoder_seq = token_length(example_inputs, decoder=True)
    has_seq = any(SEQ_DIM in a.values() or DECODER_SEQ_DIM in a.values() for a in axes_in.values())
    res = []
    for o in outputs:
        a: dict[int, str] = {}
        if axes_in and o.dim() >= 1 and o.shape[0] == batch:
            a[0] = BATCH_DIM
        if has_seq and o.dim() >= 3 and decoder_seq is not None and o.shape[1] == decoder_seq:
            a[1] = DECODER_SEQ_DIM  # a sequence-to-sequence model's outputs follow the target side
        elif has_seq and o.dim() >= 3 and seq is not None and o.shape[1] == seq:
            a[1] = SEQ_DIM
        res.append(a)
    return res


def fix_static_output_dims(model: onnx.ModelProto, output_names, ref_outs, out_axes) -> None:
    """Give graph outputs their static sizes where the exporter left a symbol (legacy: ``[batch,
    'Divembedding_dim_1']``), and the declared names where it left none."""
    for vi in model.graph.output:
        if vi.name not in output_names:
            continue
        i = output_names.index(vi.name)
        ref, axes = ref_outs[i], out_axes[i]
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != ref.dim():
            continue
        for axis, d in enumerate(dims):
            if axis in axes:
                if not d.dim_param and not d.HasField("dim_value"):
                    d.dim_param = axes[axis]
            elif d.dim_param:
                d.dim_value = int(ref.shape[axis])


def rename_dims(model: onnx.ModelProto, wanted: Mapping[str, Mapping[int, str]]) -> None:
    """Rename the exporter's symbols (s0, s1, …) to the dim names in ``wanted``, everywhere."""
    graph = model.graph
    mapping: dict[str, str] = {}
    for vi in list(graph.input) + list(graph.output):
        for axis, name in wanted.get(vi.name, {}).items():
            dims = vi.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param and dims[axis].dim_param != name:
                mapping.setdefault(dims[axis].dim_param, name)
    if not mapping:
        return

    def fix(vis: Iterable[onnx.ValueInfoProto]):
        for vi in vis:
            if not vi.type.HasField("tensor_type"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]

    def walk(g: onnx.GraphProto):
        fix(g.input)
        fix(g.output)
        fix(g.value_info)
        for n in g.node:
            for at in n.attribute:
                if at.type == onnx.AttributeProto.GRAPH:
                    walk(at.g)
                elif at.type == onnx.AttributeProto.GRAPHS:
                    for sg in at.graphs:
                        walk(sg)

    walk(graph)
