"""Reading models in and writing explainers out: validation of files, external data, safe saves."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lrpc import safeio
from lrpc.errors import LrpcError

# Explainers up to this size are written as one self-contained file; larger ones keep their
# weights in `<output>.data` beside the model (protobuf cannot hold more than 2 GB).
INLINE_LIMIT_BYTES = 1_500_000_000
# The most bytes read from a model file before parsing: protobuf cannot parse a message of 2 GiB or more.
MAX_PROTO_BYTES = 2**31 - 1


def read_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without reading its external weights, after checking those exist."""
    path = Path(path)
    if path.is_dir():
        raise LrpcError(f"{path} is a directory, not an ONNX file: give the .onnx file inside it")
    if not path.exists():
        raise LrpcError(f"{path} does not exist: check the path")
    try:
        proto = onnx.load_model_from_string(_read_capped(path))
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise LrpcError(f"{path} is not a valid ONNX file (truncated or not ONNX: {type(exc).__name__}); "
                        "re-export the model") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise LrpcError(f"{path} is not a valid ONNX model (it has no graph); re-export the model")
    _check_external_data(proto, path.parent)
    check_structure(path)
    return proto


def _read_capped(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_PROTO_BYTES. Opened non-blocking and checked with fstat
    on the open descriptor, so a FIFO, socket or device is refused at once (no hang, no endless read)."""
    _refuse_special(path, path.stat(), "ONNX")  # a socket cannot even be opened
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        _refuse_special(path, info, "ONNX")  # replaced between the two looks
        if info.st_size > MAX_PROTO_BYTES:
            raise LrpcError(f"{path} is {info.st_size} bytes, more than the {MAX_PROTO_BYTES} one ONNX file can "
                            "hold (protobuf's limit); keep the weights as external data (a .onnx.data file)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PROTO_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PROTO_BYTES:  # it grew while being read
        raise LrpcError(f"{path} grew past {MAX_PROTO_BYTES} bytes while being read; give a finished file")
    return data


def _refuse_special(path: Path, info: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise LrpcError(f"{path} is not a regular file (a device, FIFO or socket): give the {what} file itself")


def check_structure(path: Path) -> None:
    """onnx's checker (SSA names, topological order, defined inputs, tensor sizes, op schemas), as one line.
    Given the path, it resolves external data beside the file without reading the weights."""
    what = str(path)
    try:
        onnx.checker.check_model(what)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()[:300]
        if any(m in first for m in ("No Op registered", "No opset import for domain", "is not a registered")):
            return  # ops onnx does not know (onnxruntime's fused ops): decomposed later, or a clear no-rule error
        raise LrpcError(f"{what} is not a valid ONNX model ({first}); re-export the model") from None


def external_locations(proto: onnx.ModelProto) -> dict[str, str]:
    """{tensor name: external-data location} of every tensor whose bytes are not in the proto."""
    return {tensor.name: {e.key: e.value for e in tensor.external_data}.get("location", "")
            for tensor in onnx.external_data_helper._get_all_tensors(proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL}


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    """Every external-data file lies inside the model's folder (no absolute path, no `..`, no symbolic link),
    is a regular file, and holds the bytes its tensors need. No weight is read."""
    folder = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        relative = info.get("location", "")
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise LrpcError(f"weights of '{tensor.name}' point at {relative!r}, outside the model's folder; "
                            "external-data locations must be relative paths inside it (re-save the model)")
        location = base / relative
        if not location.exists():
            raise LrpcError(f"external-data file {location} (weights of '{tensor.name}') is missing: "
                            "copy it next to the .onnx file")
        if location.is_symlink() or not location.resolve().is_relative_to(folder):  # onnx refuses links too
            raise LrpcError(f"external-data file {location} (weights of '{tensor.name}') is a link (to "
                            f"{location.resolve()}), not a file inside the model's folder: copy the file there")
        _refuse_special(location, location.stat(), "external-data")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if location.stat().st_size < end:
            raise LrpcError(f"external-data file {location} is truncated (weights of '{tensor.name}' "
                            f"need {end} bytes, the file has {location.stat().st_size}); copy it again")


def to_ir(proto: onnx.ModelProto, base_dir: str | os.PathLike | None) -> ir.Model:
    """The one place external data is resolved: relative to `base_dir`, the model's own folder, after
    checking that every location stays inside it. A proto with no folder (loaded with
    `load_external_data=False` and passed in memory) has nowhere safe to resolve against: refused, rather
    than read against the current directory or at whatever absolute path it names."""
    if base_dir is None:
        unread = external_locations(proto)
        if unread:
            name, location = next(iter(unread.items()))
            raise LrpcError(f"the model's weights are not in the proto ('{name}' points at external data "
                            f"{location!r}): load it with onnx.load(path), which reads its data, or pass the "
                            ".onnx path instead of the proto")
    else:
        _check_external_data(proto, Path(base_dir))
    check_runtime_opset(proto)
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def check_runtime_opset(proto: onnx.ModelProto) -> None:
    """Refuse a default-domain opset the installed onnxruntime cannot load: its explainer would be unusable."""
    import onnxruntime
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and not _runtime_loads_opset(entry.version):
            raise LrpcError(f"the model imports ONNX opset {entry.version}, which onnxruntime "
                            f"{onnxruntime.__version__} cannot load (onnx {onnx.__version__} knows up to "
                            f"{onnx.defs.onnx_opset_version()}); re-export it with an older opset")


@functools.lru_cache(maxsize=None)
def _runtime_loads_opset(version: int) -> bool:
    """Whether onnxruntime opens a one-Identity model at this opset (it has no query for its maximum)."""
    if version > onnx.defs.onnx_opset_version():
        return False
    import onnxruntime
    from onnx import helper
    vector = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", vector[:1], vector[1:])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)], ir_version=8)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    try:
        onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 (onnxruntime raises its own exception types)
        return False
    return True


def check_writable(output: str | os.PathLike, force: bool, inputs=()) -> Path:
    """Fail early on an output `save_model` would refuse (an input, an existing file without force, …)."""
    output = Path(output)
    return safeio.check_output(output, force=force, inputs=inputs, companions=[output.name + ".data"])


def save_model(model: ir.Model, output: str | os.PathLike, force: bool = False,
               reuse_weights: bool = False, inputs=()) -> Path:
    """Write through `safeio.publish` (atomic, exclusive without force, nothing left on failure).

    The model's own external-data files count as inputs: an output there is refused. With
    `reuse_weights`, initializers still stored in the original model's external-data file(s) keep
    pointing at them (relative to the explainer's folder) instead of being copied; new constants are
    written inline, or into `<output>.data` when they are large."""
    output = Path(output)
    inputs = [*inputs, *_external_files(model)]
    check_writable(output, force, inputs)
    data_name = output.name + ".data"
    if reuse_weights and _reused(model):
        return _save_reusing_weights(model, output, data_name, force, inputs)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)

    def write(path: Path) -> None:
        if size > INLINE_LIMIT_BYTES:  # every weight, the original external ones included, is copied
            ir.save(model, path, external_data=data_name)
        else:  # inline: weights still in the original model's external-data file are read in and copied
            ir.external_data.load_to_model(model)
            ir.save(model, path)
    return safeio.publish(output, write, force=force, inputs=inputs, companions=[data_name])


def _external_files(model: ir.Model) -> list[Path]:
    return sorted({Path(v.const_value.base_dir) / v.const_value.location for v in _reused(model)})


def _reused(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]


def _save_reusing_weights(model: ir.Model, output: Path, data_name: str, force: bool, inputs) -> Path:
    folder = output.parent.resolve()
    relocated = {}
    for value in _reused(model):
        tensor = value.const_value
        target = (Path(tensor.base_dir) / tensor.location).resolve()
        relative = Path(os.path.relpath(target, folder))
        if relative.is_absolute() or ".." in relative.parts:
            raise LrpcError(f"--reuse-weights: {target} is outside the explainer's folder {folder}, and onnxruntime "
                            "refuses external data outside a model's folder; write the explainer (-o) into "
                            f"{target.parent} or a folder above it")
        relocated[value.name] = relative.as_posix()
    proto = ir.to_proto(model)  # external tensors stay references: no weight is read
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in relocated:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = relocated[tensor.name]
    inline = sum(len(t.raw_data) for t in onnx.external_data_helper._get_all_tensors(proto) if t.HasField("raw_data"))

    def write(path: Path) -> None:
        if inline > INLINE_LIMIT_BYTES:  # the new constants alone are large: they go to the explainer's own file
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))
    return safeio.publish(output, write, force=force, inputs=inputs, companions=[data_name])
