"""Golden plans: the rule assignment of every zoo model, per exporter, stored under models/golden/.

`python -m lrpc.models.golden --update` rewrites them after an intended change to a pass; the test
suite diffs fresh plans against them (the same check users copy into their own CI with `lrpc diff`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"
EXPORTS = (("dynamo", None), ("dynamo", 18), ("legacy", 17))
PRESETS = ("attnlrp", "cp-lrp")


def export_id(exporter: str, opset: int | None) -> str:
    return f"{exporter}{opset or ''}"


def golden_path(name: str, exporter: str, opset: int | None, preset: str) -> Path:
    return GOLDEN_DIR / f"{name}.{export_id(exporter, opset)}.{preset}.json"


def fresh_plan(proto, preset: str, source: str) -> dict:
    from lrpc.compiler import plan_document
    doc = plan_document(proto, preset, source=source)
    return doc


def update(names: list[str] | None = None) -> None:
    from lrpc import models
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name in names or models.names():
        entry = models.get(name)
        module, _ = entry.build()
        for exporter, opset in EXPORTS:
            if exporter not in entry.exporters:
                continue
            proto = entry.export(exporter=exporter, opset=opset, module=module)
            for preset in PRESETS:
                source = f"zoo:{name} ({export_id(exporter, opset)})"
                doc = fresh_plan(proto, preset, source)
                golden_path(name, exporter, opset, preset).write_text(json.dumps(doc, indent=1) + "\n")
                print(f"{source} {preset}: {doc['summary']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update", action="store_true", help="rewrite the golden plans")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    if args.update:
        update(args.names or None)
    else:
        parser.print_help()
