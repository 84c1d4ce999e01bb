"""lrpc ops: the ops that have a relevance rule."""

from __future__ import annotations

HELP = "list the ops that have a relevance rule"
EXAMPLES = ""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    return cmd_ops(args)


def cmd_ops(args) -> int:
    from lrpc import rules
    print("ops with an exact local rule (the ε-rule with ε → 0 / Input×Gradient):")
    print("  " + ", ".join(sorted(rules.VJP)))
    print("AttnLRP rules the passes assign to single nodes:")
    print("  " + ", ".join(sorted(rules.LRP_RULES)))
    return 0
