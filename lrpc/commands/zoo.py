"""lrpc zoo: the model zoo (names for every command that takes a model)."""

from __future__ import annotations

HELP = "list the model zoo"
EXAMPLES = ""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    import json

    from lrpc import models
    rows = [{"name": e.name, "family": e.family, "task": e.task, "exporters": list(e.exporters)}
            for e in (models.get(n) for n in models.names())]
    rows += [{"name": name, "family": name, "task": "image-text-similarity",
              "exporters": list(next(iter(towers.values())).exporters)} for name, towers in models.TOWERS.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<20} {r['family']:<18} {r['task']:<22} {', '.join(r['exporters'])}")
    return 0
