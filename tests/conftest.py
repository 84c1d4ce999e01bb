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
    from lrpc import export_axes, hf, models
    sources = sorted(Path(models.__file__).parent.glob("*.py")) + [
        Path(m.__file__) for m in (lrpc.torch_export, export_axes, hf)]
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


# ------------------------------------------------------------------------------------------------
# what the fuzzers ran (tests/test_fuzz.py's STATS), summed over the xdist workers, after the results
# ------------------------------------------------------------------------------------------------

def _fuzz_stats() -> dict | None:
    import sys
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not (fuzz.STATS["graphs"] or fuzz.STATS["blocks"]):
        return None
    return {**fuzz.STATS, "budget": [fuzz.EXAMPLES, fuzz.BLOCK_EXAMPLES]}


def pytest_configure(config):
    config._lrpc_fuzz = []


def pytest_sessionfinish(session):
    stats = _fuzz_stats()
    if stats is None:
        return
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand them to the controller
        import json
        session.config.workeroutput["lrpc_fuzz"] = json.dumps(stats)
    else:
        session.config._lrpc_fuzz.append(stats)


def pytest_testnodedown(node, error):  # xdist controller: one worker finished
    import json
    data = getattr(node, "workeroutput", {}).get("lrpc_fuzz")
    if data:
        node.config._lrpc_fuzz.append(json.loads(data))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    runs = config._lrpc_fuzz
    if not runs:
        return
    graphs, blocks = sum(r["graphs"] for r in runs), sum(r["blocks"] for r in runs)
    budget = runs[0]["budget"]
    terminalreporter.write_line(
        f"[fuzz] budget {budget[0]} graphs / {budget[1]} block stacks per test; ran {graphs} graphs "
        f"(max rel. error {max(r['max_err'] for r in runs):.2e}) and {blocks} block stacks "
        f"(max rel. error {max(r['block_max_err'] for r in runs):.2e})")
