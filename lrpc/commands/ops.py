"""lrpc ops: the ops that have a relevance rule."""

from __future__ import annotations

HELP = "list the ops lrpc knows: rule, decomposed, control flow, refused (and why) or zero derivative"
EXAMPLES = ""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    return cmd_ops(args)


def cmd_ops(args) -> int:
    from lrpc import ops, rules
    print("ops with an exact local rule (the ε-rule with ε → 0 / Input×Gradient), under every preset:")
    print("  " + ", ".join(ops.with_vjp()))
    print("fused ops, kept for the forward and decomposed into the ops above for the relevance:")
    print("  " + ", ".join(ops.of_kind(ops.FUSED)))
    print("fused ops recognised and refused (the compile error says why):")
    print("  " + ", ".join(ops.of_kind(ops.REFUSED)))
    print("ops with zero derivative (their outputs never carry relevance):")
    print("  " + ", ".join(ops.of_kind(ops.NON_DIFFERENTIABLE)))
    print("AttnLRP rules the passes assign to single nodes:")
    print("  " + ", ".join(sorted(rules.RULES)))
    print("per op (an ONNX op not listed is expanded into its function body if its schema has one; else a "
          "model where relevance flows through it is refused):")
    for op, status, detail in ops.describe():
        print(f"  {op:48s} {status:16s} {detail}")
    return 0
