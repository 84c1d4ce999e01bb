"""Export a PyTorch module to ONNX with dynamic batch / sequence axes.

``export_onnx(module, example_inputs)`` wraps ``torch.onnx.export`` for the two exporters
torch ships:

- ``"dynamo"`` (default): ``torch.export`` + the onnxscript translator, at the exporter's
  default opset (or ``opset=18``). Dynamic shapes are declared with ``torch.export.Dim``.
- ``"legacy"``: the TorchScript tracer at opset 17 (``opset`` overrides), with
  ``dynamic_axes``.

Axis 0 of every input is the dynamic ``batch`` axis. For token inputs (integer tensors, or any
input of rank 2 whose second axis matches the token length) axis 1 is the dynamic
``sequence`` axis; image / float inputs of rank ≥ 3 keep every axis but the batch static.
Symbolic dims in the returned model are named ``batch`` and ``sequence`` for both exporters.

The module's ``forward`` must take the example inputs as keyword arguments (in the dict's
order) and return a tensor, or a tuple / list / dict of tensors, or an object with a
``logits`` / ``last_hidden_state`` attribute (Hugging Face ``ModelOutput``): it is wrapped so
that the exported graph has plain tensor outputs, named ``output_names`` (default: ``logits``
for one output, ``output_0``, ``output_1``, … for several).

If ``path`` is given the model is written there (weights in ``<path>.data`` beside it when
the model is large or ``external_data=True``) and the returned ``ModelProto`` is re-loaded
from disk with its external data.

Errors raised by either exporter become one ``ExportError`` whose one-line message names the
module class, the exporter and, when visible, the failing aten op.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from lrpc import export_axes as axes, safeio, validate
from lrpc.export_axes import BATCH_DIM, SEQ_DIM

__all__ = ["ExportError", "export_onnx", "EXPORTERS", "BATCH_DIM", "SEQ_DIM"]

EXPORTERS = ("dynamo", "legacy")
LEGACY_DEFAULT_OPSET = 17
#: (oldest, newest) opset each exporter of the pinned torch writes as asked; outside it the dynamo exporter
#: silently writes another opset and the legacy one fails deep inside
OPSETS = {"dynamo": (18, 23), "legacy": (7, 20)}
#: save weights as external data above this many bytes when ``external_data`` is None
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024


class ExportError(Exception):
    """The torch → ONNX exporter failed; the message is one line and names module and op."""

    def __init__(self, message: str, *, module: str | None = None, op: str | None = None,
                 exporter: str | None = None):
        super().__init__(message)
        self.module = module
        self.op = op
        self.exporter = exporter


# --------------------------------------------------------------------------------------------
# output flattening wrapper
# --------------------------------------------------------------------------------------------

def _flatten_outputs(out: Any) -> tuple:
    import torch

    if isinstance(out, torch.Tensor):
        return (out,)
    for attr in ("logits", "last_hidden_state"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return (val,)
    if isinstance(out, Mapping):
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        flat: list = []
        for o in out:
            if isinstance(o, torch.Tensor):
                flat.append(o)
        return tuple(flat)
    raise TypeError(f"cannot turn a {type(out).__name__} output into tensors")


def _takes_names_positionally(module, names: Sequence[str]) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if pos[: len(names)] != list(names):
        return False
    # every later parameter must have a default
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[len(names):])


def _make_wrapper(module, names: Sequence[str], out: Any = None):
    """An nn.Module whose forward takes ``names`` positionally and returns plain tensors.

    The module itself when it already does (so initializer names keep their state-dict keys),
    else a thin wrapper (initializers then start with ``inner.``)."""
    import torch

    if isinstance(out, torch.Tensor) and _takes_names_positionally(module, names):
        return module
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"input names must be Python identifiers to wrap the module, got {bad}")

    class _PlainOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    # Build a forward with an explicit signature so both exporters see named parameters.
    params = ", ".join(names)
    src = (
        f"def forward(self, {params}):\n"
        f"    out = self.inner({', '.join(f'{n}={n}' for n in names)})\n"
        f"    flat = _flatten(out)\n"
        f"    return flat[0] if len(flat) == 1 else flat\n"
    )
    ns: dict = {"_flatten": _flatten_outputs}
    exec(compile(src, "<lrpc.torch_export wrapper>", "exec"), ns)
    _PlainOutputs.forward = ns["forward"]
    wrapper = _PlainOutputs(module)
    wrapper.eval()
    return wrapper


# --------------------------------------------------------------------------------------------
# error condensation
# --------------------------------------------------------------------------------------------

_OP_PATTERNS = (
    re.compile(r"(aten::[A-Za-z_0-9.]+)"),
    re.compile(r"(aten\.[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)"),
    re.compile(r"operator '?([A-Za-z_:0-9.]+)'?"),
    re.compile(r"target[= ]'?([A-Za-z_:0-9.]+)'?"),
)


def _failing_op(msg: str) -> str | None:
    for pat in _OP_PATTERNS:
        m = pat.search(msg)
        if m:
            return m.group(1)
    return None


def _one_line(exc: BaseException) -> tuple[str, str, str]:
    chain = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 6:
        chain.append(e)
        e = e.__cause__ or e.__context__
    # the innermost error usually says what really went wrong
    text = ""
    for e in reversed(chain):
        s = str(e).strip()
        if s:
            text = s
            break
    full = "\n".join(str(e) for e in chain)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    if len(first) > 300:
        first = first[:297] + "..."
    return first, full, type(chain[-1]).__name__


def _module_label(module) -> str:
    """``Outer(Inner)`` for a thin wrapper around one model, else the class name."""
    cls = type(module).__name__
    children = list(module.children())
    if len(children) == 1:
        cls += f"({type(children[0]).__name__})"
    return cls


def _raise_export_error(module, exporter: str, opset, exc: BaseException):
    cls = _module_label(module)
    first, full, etype = _one_line(exc)
    op = _failing_op(full)
    where = f" at op {op}" if op else ""
    msg = f"{cls}: {exporter} ONNX export (opset {opset if opset else 'default'}) failed{where}: {etype}: {first}"
    raise ExportError(msg, module=cls, op=op, exporter=exporter) from exc


# --------------------------------------------------------------------------------------------
# mixture-of-experts: a traceable experts implementation
# --------------------------------------------------------------------------------------------

#: transformers' experts implementation that both exporters trace (docs/design.md, "Mixture of experts and encoder–decoder models")
TRACEABLE_EXPERTS = "batched_mm"


def _traceable_experts(module):
    """Switch every Hugging Face model inside `module` whose experts have several implementations to
    ``batched_mm`` for the export; returns the function that restores what each had.

    The default (``grouped_mm``) calls the opaque custom op ``transformers::grouped_mm_fallback`` and
    ``eager`` loops over the experts that data-dependently received tokens; ``batched_mm`` gathers each
    (token, expert) pair's weights and runs one batched matmul, which traces with dynamic shapes.
    A mixture-of-experts block (transformers' convention: an ``experts`` child) outside every switchable
    model runs such a loop: torch.export fails on it and TorchScript bakes the example's routing into the
    graph (other inputs then fail in onnxruntime, or send tokens to the wrong experts), so it is refused."""
    import torch
    switchable = []
    for sub in module.modules():
        can = getattr(type(sub), "_can_set_experts_implementation", None)
        if can is not None and hasattr(sub, "set_experts_implementation") and can():
            switchable.append(sub)
    covered = {id(m) for sub in switchable for m in sub.modules()}
    loose = next((sub for sub in module.modules() if isinstance(getattr(sub, "experts", None), torch.nn.Module)
                  and id(sub) not in covered), None)
    if loose is not None:
        label = _module_label(module)
        raise ExportError(f"{label}: {type(loose).__name__} runs its experts in a data-dependent loop and transformers "
                          f"offers no '{TRACEABLE_EXPERTS}' experts implementation for it, so no exporter can trace it "
                          "faithfully (this mixture-of-experts family is not supported)", module=label)
    switched = []
    for sub in switchable:
        before = sub.get_experts_implementation()
        if any(v != TRACEABLE_EXPERTS for v in before.values()):
            sub.set_experts_implementation(TRACEABLE_EXPERTS)
            switched.append((sub, before))

    def restore():
        for sub, before in reversed(switched):
            sub.set_experts_implementation(before)
    return restore


# --------------------------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------------------------

def export_onnx(
    module,
    example_inputs: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic: bool = True,
    output_names: Sequence[str] | None = None,
    external_data: bool | None = None,
    optimize: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` called as ``module(**example_inputs)`` to an ONNX ``ModelProto``.

    exporter: ``"dynamo"`` (torch.export; opset = exporter default unless given) or
    ``"legacy"`` (TorchScript; opset 17 unless given). dynamic: batch axis 0 of every input,
    sequence axis 1 of token inputs. output_names: names of the flattened outputs.
    path: also write the model there (external data when large / ``external_data=True``);
    the returned proto then holds the weights loaded back from disk.
    Raises ExportError (one line, names module class and failing op) if the exporter fails.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    oldest, newest = OPSETS[exporter]
    opset = validate.export_opset(opset, newest=newest, oldest=oldest)
    names = list(example_inputs)
    if not names:
        raise ValueError("example_inputs is empty")
    was_training = module.training
    module.eval()
    with torch.no_grad():
        raw = module(**example_inputs)
    wrapper = _make_wrapper(module, names, raw)
    ref_outs = _flatten_outputs(raw)
    if output_names is None:
        output_names = ["logits"] if len(ref_outs) == 1 else [f"output_{i}" for i in range(len(ref_outs))]
    output_names = list(output_names)
    if len(output_names) != len(ref_outs):
        raise ValueError(f"{len(output_names)} output_names for {len(ref_outs)} outputs")

    in_axes = axes.dynamic_axes_for(example_inputs, dynamic)
    out_axes = axes.output_axes(ref_outs, example_inputs, in_axes) if dynamic else [{} for _ in ref_outs]
    wanted = dict(in_axes)
    wanted.update({n: a for n, a in zip(output_names, out_axes)})

    t0 = time.perf_counter()
    restore_experts = _traceable_experts(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                proto = _export_dynamo(wrapper, example_inputs, names, output_names, in_axes, opset, optimize)
            else:
                proto = _export_legacy(wrapper, example_inputs, names, output_names, in_axes,
                                       dict(zip(output_names, out_axes)), opset or LEGACY_DEFAULT_OPSET)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - every exporter failure becomes one ExportError
        _raise_export_error(module, exporter, opset or (LEGACY_DEFAULT_OPSET if exporter == "legacy" else None), exc)
    finally:
        restore_experts()
        if was_training:
            module.train()
    _check_unique_names(proto, type(module).__name__, exporter)
    if dynamic:
        axes.rename_dims(proto, wanted)
    axes.fix_static_output_dims(proto, output_names, ref_outs, out_axes)
    proto.doc_string = (proto.doc_string + "\n" if proto.doc_string else "") + (
        f"lrpc.torch_export: {type(module).__name__} via {exporter} in {time.perf_counter() - t0:.1f}s"
    )

    if path is None:
        return proto
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _weights_nbytes(proto) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"

    def write(tmp: Path) -> None:  # a fresh folder: onnx appends to an existing data file
        onnx.save_model(proto, str(tmp), save_as_external_data=bool(external_data), all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    safeio.publish(path, write, force=True, companions=[data_name])
    return onnx.load_model(str(path), load_external_data=True)


def _weights_nbytes(proto: onnx.ModelProto) -> int:
    total = 0
    for init in proto.graph.initializer:
        total += len(init.raw_data) if init.raw_data else init.ByteSize()
    return total


def _export_dynamo(wrapper, example_inputs, names, output_names, in_axes, opset, optimize) -> onnx.ModelProto:
    import torch
    from torch.export import Dim

    dims: dict[str, Any] = {}
    dynamic_shapes = None
    if in_axes:
        dynamic_shapes = {}
        for name in names:
            spec = {}
            for axis, dname in in_axes[name].items():
                if dname not in dims:
                    # min=1 so batch / sequence 1 stay legal at run time
                    dims[dname] = Dim(dname, min=1, max=1 << 16) if dname == BATCH_DIM else Dim(dname, min=1, max=1 << 16)
                spec[axis] = dims[dname]
            dynamic_shapes[name] = spec or None
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        prog = torch.onnx.export(
            wrapper, (), None, kwargs=dict(example_inputs), dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=names, output_names=output_names, optimize=optimize, verbose=False, **kwargs,
        )
    _free_output_names(prog.model.graph)
    return prog.model_proto


def _free_output_names(graph) -> None:
    """The dynamo exporter names internal values after their op (``embedding``, ``linear_4``…);
    one may carry a requested output name and make the model invalid ("Duplicate definition").
    Rename every such internal value (onnx-ir graph) so the graph outputs own their names."""
    out_names = {v.name for v in graph.outputs}
    taken: set[str] = set()
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph.all_nodes() if hasattr(graph, "all_nodes") else graph:
        values.extend(node.outputs)
    for v in values:
        if v.name:
            taken.add(v.name)
    outputs = set(id(v) for v in graph.outputs)
    for v in values:
        if v.name in out_names and id(v) not in outputs and not v.is_graph_input() and not v.is_initializer():
            k = 1
            while f"{v.name}_{k}" in taken:
                k += 1
            v.name = f"{v.name}_{k}"
            taken.add(v.name)


def _check_unique_names(proto: onnx.ModelProto, module_cls: str, exporter: str) -> None:
    seen: set[str] = set()
    defined = [i.name for i in proto.graph.input] + [i.name for i in proto.graph.initializer]
    defined += [o for n in proto.graph.node for o in n.output if o]
    for name in defined:
        if name in seen:
            raise ExportError(f"{module_cls}: {exporter} ONNX export produced an invalid model: "
                              f"value {name!r} is defined twice (rename the output)", module=module_cls,
                              exporter=exporter)
        seen.add(name)


def _export_legacy(wrapper, example_inputs, names, output_names, in_axes, out_axes, opset) -> onnx.ModelProto:
    import torch

    dynamic_axes = {**in_axes, **{k: v for k, v in out_axes.items() if v}} or None
    buf = io.BytesIO()
    torch.onnx.export(
        wrapper, tuple(example_inputs[n] for n in names), buf, dynamo=False, opset_version=opset,
        input_names=names, output_names=output_names, dynamic_axes=dynamic_axes,
        do_constant_folding=True, verbose=False,
    )
    return onnx.load_model_from_string(buf.getvalue())
