"""lrpc diff: compare the rule assignments of two models or saved plans."""

from __future__ import annotations

from lrpc.commands.common import add_rule_options, load_plan

HELP = "compare the rule assignments of two models or saved plans (exit 1 if they differ)"
EXAMPLES = """examples:
  lrpc diff plan.json new_model.onnx                        # a saved plan against a model
  lrpc diff a.onnx b.onnx --preset cp-lrp
"""


def add_arguments(p) -> None:
    p.add_argument("a")
    p.add_argument("b")
    add_rule_options(p)


def run(args) -> int:
    from lrpc import planio
    a, b = load_plan(args.a, args), load_plan(args.b, args)
    lines = planio.diff(a, b, args.a, args.b)
    if not lines:
        print(f"plans agree: {sum(a['summary'].values())} rule-bearing nodes, {a['summary']}")
        return 0
    print("\n".join(lines))
    return 1
