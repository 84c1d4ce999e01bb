"""Reading models in and writing explainers out: validation of files, external data, atomic saves."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lrpc.errors import LrpcError

# Explainers up to this size are written as one self-contained file; larger ones keep their
# weights in `<output>.data` beside the model (protobuf cannot hold more than 2 GB).
INLINE_LIMIT_BYTES = 1_500_000_000


def read_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without reading its external weights, after checking those exist."""
    path = Path(path)
    if path.is_dir():
        raise LrpcError(f"{path} is a directory, not an ONNX file: give the .onnx file inside it")
    if not path.exists():
        raise LrpcError(f"{path} does not exist: check the path")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise LrpcError(f"{path} is not a valid ONNX file (truncated or not ONNX: {type(exc).__name__}); "
                        "re-export the model") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise LrpcError(f"{path} is not a valid ONNX model (it has no graph); re-export the model")
    _check_external_data(proto, path.parent)
    return proto


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = base / info.get("location", "")
        if not location.is_file():
            raise LrpcError(f"external-data file {location} (weights of '{tensor.name}') is missing: "
                            "copy it next to the .onnx file")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if location.stat().st_size < end:
            raise LrpcError(f"external-data file {location} is truncated (weights of '{tensor.name}' "
                            f"need {end} bytes, the file has {location.stat().st_size}); copy it again")


def to_ir(proto: onnx.ModelProto, base_dir: str | os.PathLike | None) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def check_writable(output: str | os.PathLike, force: bool) -> Path:
    """Refuse to clobber an existing file unless asked, and fail early on an unwritable folder."""
    output = Path(output)
    if output.exists() and not force:
        raise LrpcError(f"{output} already exists: pass --force to overwrite it, or choose another -o path")
    if output.is_dir():
        raise LrpcError(f"{output} is a directory: give a file path such as {output / 'explainer.onnx'}")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise LrpcError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise LrpcError(f"output folder {folder} is not writable: choose another -o path")
    return output


def save_model(model: ir.Model, output: str | os.PathLike, force: bool = False) -> Path:
    """Write atomically: into a temporary folder beside the target, then move into place."""
    output = check_writable(output, force)
    data_name = output.name + ".data"
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    tmp = Path(tempfile.mkdtemp(prefix=".lrpc-", dir=output.parent))
    try:
        if size > INLINE_LIMIT_BYTES:
            ir.save(model, tmp / output.name, external_data=data_name)
        else:
            ir.save(model, tmp / output.name)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, output.parent / data_name)
        os.replace(tmp / output.name, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
