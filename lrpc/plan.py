"""The plan: which rule each node gets, recorded by the passes and read by the emitter and `lrpc plan`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir


@dataclass(frozen=True)
class RuleRecord:
    rule: str                 # a key of lrpc.rules.LRP_RULES, or "inside" for ops covered by a region
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
        return Counter(r.rule for r in self.records.values() if r.rule != "inside")
