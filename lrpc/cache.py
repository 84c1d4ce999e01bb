"""The compile cache: explainers compiled on the way (by `lrpc explain`, `lrpc.Attributor`, the demo) are
kept under $LRPC_CACHE or ~/.cache/lrpc, keyed by a hash of the model, the options and the compiler's own
source (`compiler_fingerprint`), so a cached explainer is never stale."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import onnx

from lrpc import contract, safeio
from lrpc.errors import LrpcError


def cache_dir(cache: str | os.PathLike | None) -> Path:
    return safeio.folder(cache or os.environ.get("LRPC_CACHE") or Path.home() / ".cache" / "lrpc", "cache")


def compiler_fingerprint() -> str:
    """Changes whenever lrpc's compiler or passes change, so a cached explainer is never stale."""
    import lrpc
    import lrpc.passes
    digest = hashlib.sha256(lrpc.__version__.encode())
    for folder in (Path(lrpc.__file__).parent, Path(lrpc.passes.__file__).parent):
        for source in sorted(folder.glob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _hash_file(digest, path: Path) -> None:
    digest.update(path.name.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def model_hash(model) -> tuple[str, str]:
    """(a content hash, a short name) for any model source lrpc accepts."""
    digest = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        digest.update(model.SerializeToString())
        return digest.hexdigest()[:16], "model"
    path = Path(model)
    if path.is_file():
        _hash_file(digest, path)
        proto = onnx.load_model(str(path), load_external_data=False)
        locations = {e.value for t in onnx.external_data_helper._get_all_tensors(proto)
                     if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
        for location in sorted(locations):
            if (path.parent / location).is_file():
                _hash_file(digest, path.parent / location)
        return digest.hexdigest()[:16], path.stem
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            _hash_file(digest, file)
        return digest.hexdigest()[:16], path.name
    from lrpc import models
    if models.known(str(model)):
        for source in sorted(Path(models.__file__).parent.glob("*.py")):
            digest.update(source.read_bytes())
        digest.update(str(model).encode())
        return digest.hexdigest()[:16], str(model)
    raise LrpcError(f"{model} is not an ONNX file, an explainer, a Hugging Face folder or a zoo model "
                    "(`lrpc zoo` lists them)")


def is_explainer(model) -> bool:
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.is_file():
            return False
        from lrpc.loading import read_proto
        proto = read_proto(path)
    return contract.read_metadata({p.key: p.value for p in proto.metadata_props}) is not None


def onnx_source(model, task: str | None, pooling: str | None = None):
    """An ONNX path or proto for a model source (HF folders and zoo names are exported); with `pooling`,
    the encoder's L2-normalised pooled embedding (lrpc/embedding.py)."""
    if pooling is None and (isinstance(model, onnx.ModelProto) or Path(model).is_file()):
        return model
    if pooling is None:
        from lrpc.frontend import export_hf
        return export_hf(model, task=task)
    from lrpc import embedding
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif Path(model).is_file():
        from lrpc.loading import read_proto
        read_proto(model)   # the checks and their one-line errors, before loading the weights
        proto = onnx.load_model(str(model))
    else:
        from lrpc.frontend import export_hf
        proto = export_hf(model, task=task or "feature-extraction",
                          hf_output=embedding.POOLER_OUTPUT if pooling == "pooler" else None)
    return embedding.pooled(proto, pooling)


def compiled_explainer(model, *, preset: str = "attnlrp", seed: str = "vector", latent: str | None = None,
                       layers: bool = False, task: str | None = None, output_name: str | None = None,
                       pooling: str | None = None, cache: str | os.PathLike | None = None,
                       targets: int | str | None = None, components: str | None = None,
                       conditions: str | None = None) -> tuple[Path, dict]:
    """Path of the explainer of `model` (compiled now or found in the cache) and its sidecar info
    ({"layers": [[tensor, label], ...]}). pooling: explain the encoder's pooled unit embedding.
    targets: as `lrpc compile --targets` (a K explainer). `components`: selectors whose relevance per
    position is output, their tensors also made model outputs (lrpc.components.expose: the units'
    activations). `conditions`: selectors given CRP's mask inputs (`lrpc.compile(conditions=…)`)."""
    from lrpc.compiler import CAUSAL_BLOCKS, CAUSAL_MIN_TOKENS, load, with_causal_blocks
    from lrpc.latent import residual_stream
    from lrpc.loading import save_model
    model_key, stem = model_hash(model)
    options = json.dumps({"preset": preset, "seed": seed, "latent": latent, "layers": layers, "task": task,
                          "output": output_name, "pooling": pooling, "compiler": compiler_fingerprint(),
                          **({"targets": targets} if targets is not None else {}),
                          **({"components": components} if components else {}),
                          **({"conditions": conditions} if conditions else {})}, sort_keys=True)
    key = hashlib.sha256((model_key + options).encode()).hexdigest()[:16]
    folder = cache_dir(cache)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{preset}-{key}.onnx"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        info = _read_sidecar(sidecar)
        if info.get("digest") == explainer_digest(path):
            return path, info
        # a corrupted explainer may still parse: never use it unchecked; rebuild instead of failing forever
        print(f"lrpc: the cached explainer {path} does not match its recorded digest (damaged or truncated); "
              "compiling it again", file=sys.stderr)
    source = onnx_source(model, task, pooling)
    ir_model = load(source)  # the residual stream is found in the graph compiled
    info: dict[str, Any] = {"source": str(model) if not isinstance(model, onnx.ModelProto) else "model"}
    pattern = latent
    if layers and latent is None:
        found = residual_stream(ir_model)
        info["layers"] = [list(x) for x in found]
        pattern = "^(" + "|".join(re.escape(n) for n, _ in found) + ")$" if found else None
    elif latent:
        info["layers"] = None
    if components:
        from lrpc.components import expose
        output_name = output_name or ir_model.graph.outputs[0].name
        info["activations"] = expose(ir_model, components)
    copies = iter([ir_model])

    def prepared():   # the model as loaded above, then a second copy for the causal-blocks variant
        copy = next(copies, None)
        if copy is None:
            copy = load(source)
            if components:
                expose(copy, components)
        return copy
    explainer = with_causal_blocks(prepared, CAUSAL_BLOCKS, CAUSAL_MIN_TOKENS, preset=preset, seed=seed,
                                   latent=pattern, output_name=output_name, targets=targets, components=components,
                                   per_position=bool(components), conditions=conditions)
    save_model(explainer, path, force=True)  # a cache entry: replaced when stale or half-present
    info["digest"] = explainer_digest(path)
    safeio.write_text(sidecar, json.dumps(info), force=True)
    return path, info


def explainer_digest(path: Path) -> str:
    """sha256 of a cached explainer and its external-data file (save_model writes it as `<name>.data`)."""
    digest = hashlib.sha256()
    for file in (path, path.with_name(path.name + ".data")):
        if file.is_file():
            _hash_file(digest, file)
    return digest.hexdigest()


def _read_sidecar(sidecar: Path) -> dict:
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def model_metadata(model) -> dict:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
