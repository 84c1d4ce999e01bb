"""The K axis through every op (issue 14; the harness is tests/conformance_targets.py): each op's first
ONNX node test that lrpc attributes, compiled with targets=K, gives in every row the single-target
explainer's relevance for that row's target. The whole sweep (every case) is

    python tests/conformance_targets.py -v
"""

from __future__ import annotations

import warnings

import pytest

import conformance
import conformance_targets

# ops refused under --targets although their single-target explainer compiles (none today)
REFUSED_WITH_TARGETS: dict[str, str] = {}

# ops with a case whose K rows are verified: the coverage must not go down
MIN_OPS = 173


@pytest.fixture(scope="module")
def outcomes():
    """Per op, the first case that applies (an input lrpc attributes and a single-target explainer)."""
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in conformance.collect():
            if case.op not in found or found[case.op].status == "n/a":
                found[case.op] = conformance_targets.run_case(case)
    return found


def test_every_row_equals_the_single_target_explainer(outcomes):
    bad = {op: f"{o.case}: {o.status} {o.detail}" for op, o in outcomes.items() if o.status in ("differs", "crash")}
    assert not bad, "K rows differ from the single-target explainer:\n" + "\n".join(sorted(bad.values()))


def test_refusals_under_targets_are_known(outcomes):
    refused = {op: o.detail for op, o in outcomes.items() if o.status == "refused"}
    assert set(refused) == set(REFUSED_WITH_TARGETS), refused
    assert all("\n" not in why for why in refused.values())


def test_coverage(outcomes):
    equal = sorted(op for op, o in outcomes.items() if o.status == "equal")
    print(f"K sweep subset: {len(equal)} ops verified, of {len(outcomes)}")
    assert len(equal) >= MIN_OPS
