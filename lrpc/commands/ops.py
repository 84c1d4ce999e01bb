"""lrpc ops: the ops that have a relevance rule."""

from __future__ import annotations

HELP = "list the ops that have a relevance rule"
EXAMPLES = ""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    return cmd_ops(args)


def cmd_ops(args) -> int:
    from lrpc import ops, rules
    print("ops with an exact local rule (the ε-rule with ε → 0 / Input×Gradient), under every preset:")
    print("  " + ", ".join(ops.with_vjp()))
    print("fused ops, rewritten into the ops above before analysis:")
    print("  " + ", ".join(ops.of_kind(ops.FUSED)))
    print("fused ops recognised and refused (the compile error says why):")
    print("  " + ", ".join(ops.of_kind(ops.REFUSED)))
    print("ops with zero derivative (their outputs never carry relevance):")
    print("  " + ", ".join(ops.of_kind(ops.NON_DIFFERENTIABLE)))
    print("AttnLRP rules the passes assign to single nodes:")
    print("  " + ", ".join(sorted(rules.RULES)))
    return 0
