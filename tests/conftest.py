"""Shared fixtures. Zoo exports are cached on disk for the whole run, shared by the xdist workers, so
each (model, exporter, opset) is exported once however many test files use it."""

from __future__ import annotations

import os
import warnings

import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """zoo_export(name, exporter="dynamo", opset=None) → (module, onnx.ModelProto)."""
    import hashlib
    from pathlib import Path

    import lrpc.torch_export
    from lrpc import models
    sources = sorted(Path(models.__file__).parent.glob("*.py")) + [Path(lrpc.torch_export.__file__)]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    shared = tmp_path_factory.getbasetemp().parent / f"zoo-exports-{key}"  # shared by xdist workers
    shared.mkdir(exist_ok=True)
    built = {}

    def get(name: str, exporter: str = "dynamo", opset: int | None = None):
        entry = models.get(name)
        if name not in built:
            built[name] = entry.build()[0]
        path = shared / f"{name}.{exporter}{opset or ''}.onnx"
        if not path.exists():
            proto = entry.export(exporter=exporter, opset=opset, module=built[name])
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            onnx.save(proto, tmp)
            os.replace(tmp, path)
        return built[name], onnx.load(path)
    return get
