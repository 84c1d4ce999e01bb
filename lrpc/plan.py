"""The plan: which rule each node gets, recorded by the passes and read by the emitter and `lrpc plan`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir


class Rule:
    """The rule names a plan records (docs/design.md, "Relevance semantics"); lrpc.rules holds each one's
    function. A node without a record uses its op's exact VJP (lrpc.ops)."""

    UNIFORM = "uniform"                          # bilinear product of two carrying operands: ½ of each VJP
    GATED = "gated"                              # CP-LRP gating product: the activation side takes none
    FROZEN = "frozen"                            # one operand is a normalisation statistic (a constant)
    LAYERNORM_FROZEN_STD = "layernorm-frozen-std"
    LPNORM_FROZEN_NORM = "lpnorm-frozen-norm"
    IDENTITY = "identity"                        # an activation region u → v
    INSIDE = "inside"                            # covered by another node's region or layer: no rule of its own
    SOFTMAX = "softmax"
    NONE = "none"                                # CP-LRP softmax: nothing flows in
    EPSILON = "epsilon"                          # linear layer, ε-rule
    GAMMA = "gamma"                              # linear layer, γ-rule


@dataclass(frozen=True)
class RuleRecord:
    rule: str                 # a Rule name: a key of lrpc.rules.RULES, or Rule.INSIDE
    claimed_by: str           # the pass that recorded it
    params: dict[str, Any] = field(default_factory=dict)   # arguments of the rule
    notes: dict[str, Any] = field(default_factory=dict)    # what the pass found, for `lrpc plan`


@dataclass
class Plan:
    """Node → rule. Nodes without a record use their op's exact VJP (the ε-rule with ε → 0)."""

    preset: str
    records: dict[ir.Node, RuleRecord] = field(default_factory=dict)
    cut: set[ir.Value] = field(default_factory=set)  # tensors the preset declares constant (cp-lrp)

    def claim(self, node: ir.Node, rule: str, claimed_by: str, notes: dict | None = None, **params) -> bool:
        """Record a rule unless an earlier pass claimed the node; returns whether it took."""
        if node in self.records:
            return False
        self.records[node] = RuleRecord(rule, claimed_by, params, notes or {})
        return True

    def get(self, node: ir.Node) -> RuleRecord | None:
        return self.records.get(node)

    def summary(self) -> Counter:
        return Counter(r.rule for r in self.records.values() if r.rule != Rule.INSIDE)
