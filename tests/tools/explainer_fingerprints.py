"""Fingerprints of the explainers lrpc emits for the zoo: for a refactor that must not change them.

    python tests/tools/explainer_fingerprints.py record BASELINE.json [--exports DIR]
    python tests/tools/explainer_fingerprints.py compare BASELINE.json [--exports DIR]

For every zoo model and exporter it supports, under the presets and a few option variants, it compiles
the explainer and stores the sha256 of its serialised bytes and its relevance outputs on fixed inputs.
`compare` recompiles and reports, per explainer, whether the bytes are identical and else the largest
relative difference of the relevance outputs. Exports are cached in --exports (outside the repository),
so both runs compile the very same ONNX models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESETS = ("attnlrp", "cp-lrp", "gxi")
VARIANTS = {"eps1e-6": {"epsilon": 1e-6}, "gamma0.25": {"gamma_linear": 0.25}}
VARIANT_MODELS = ("llama", "hf-vit")


def cases():
    from lrpc import models
    for name in models.names():
        entry = models.get(name)
        for exporter in entry.exporters:
            for preset in PRESETS:
                yield name, exporter, preset, None
            if name in VARIANT_MODELS:
                for variant in VARIANTS:
                    yield name, exporter, "attnlrp", variant


def exported(name: str, exporter: str, folder: Path) -> onnx.ModelProto:
    from lrpc import models
    path = folder / f"{name}.{exporter}.onnx"
    if not path.exists():
        proto = models.get(name).export(exporter=exporter)
        onnx.save(proto, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return onnx.load(str(path))


def feeds(proto: onnx.ModelProto, name: str) -> dict:
    from lrpc import models
    entry = models.get(name)
    feed = {k: v.numpy() for k, v in entry.inputs(2, entry.example_shape[1], seed=7).items()}
    names = {i.name for i in proto.graph.input}
    feed = {k: v for k, v in feed.items() if k in names}
    if "lrp_target" in names:
        feed["lrp_target"] = np.array([1, 3], np.int64)
    if "lrp_position" in names:
        feed["lrp_position"] = np.array([-1, -2], np.int64)
    return feed


def fingerprint(name, exporter, preset, variant, folder):
    import lrpc
    entry = __import__("lrpc.models", fromlist=["get"]).get(name)
    model = exported(name, exporter, folder)
    proto = lrpc.compile(model, preset=preset, output_name=entry.output_name, attribute=list(entry.attributed),
                         **(VARIANTS[variant] if variant else {}))
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs() if o.name.startswith("relevance.")]
    values = session.run(outputs, feeds(proto, name))
    return {"sha256": hashlib.sha256(data).hexdigest(), "nodes": len(proto.graph.node),
            "relevance": {k: np.asarray(v, np.float64).ravel().tolist() for k, v in zip(outputs, values)}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("record", "compare"))
    parser.add_argument("baseline")
    parser.add_argument("--exports", default="/tmp/lrpc-fingerprint-exports")
    parser.add_argument("--only", default=None, help="substring of the case key")
    args = parser.parse_args()
    folder = Path(args.exports)
    folder.mkdir(parents=True, exist_ok=True)
    baseline = json.loads(Path(args.baseline).read_text()) if args.mode == "compare" else {}
    found, worst = {}, 0.0
    for case in cases():
        key = "/".join(c for c in case if c)
        if args.only and args.only not in key:
            continue
        try:
            found[key] = fingerprint(*case, folder)
        except Exception as exc:  # noqa: BLE001 - a failure is a fingerprint too
            found[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if args.mode == "compare":
            old, new = baseline.get(key), found[key]
            if old is None:
                print(f"{key}: not in the baseline")
                continue
            if "error" in old or "error" in new:
                same = old.get("error") == new.get("error")
                print(f"{key}: {'same error' if same else 'ERROR DIFFERS'} {new.get('error', '')[:100]}")
                continue
            if old["sha256"] == new["sha256"]:
                print(f"{key}: identical bytes")
                continue
            diff = 0.0
            for out, a in old["relevance"].items():
                a, b = np.asarray(a), np.asarray(new["relevance"][out])
                diff = max(diff, float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)))
            worst = max(worst, diff)
            print(f"{key}: bytes differ (nodes {old['nodes']} → {new['nodes']}), max rel diff {diff:.2e}")
        else:
            print(f"{key}: {found[key].get('sha256', found[key].get('error'))[:80]}", flush=True)
    if args.mode == "record":
        Path(args.baseline).write_text(json.dumps(found))
    else:
        print(f"worst relative difference where bytes differ: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
