"""ONNX's backend node tests as lrpc's conformance suite (issue 18; the harness is tests/conformance.py).

The suite fails on any silently wrong or crashing case that is not listed below. `KNOWN_FAILURES` are
the cases wrong or crashing today, each with its reason, as strict xfails: a fix must remove its entry.
`NOT_YET_SUPPORTED` are the ops (or expanded function bodies) refused today with a one-line LrpcError although
they are differentiable; a new refusal outside it fails, and so does an entry no case is refused for any more.

    python tests/conformance.py --report      # the per-op table and the coverage line
"""

from __future__ import annotations

import pytest

import conformance

KNOWN_FAILURES: dict[str, str] = {   # found when node tests with numpy-scalar data were let in
    # quantization is straight-through (docs/design.md, "Quantized models"): a scale carries no relevance
    "test_dynamicquantizelinear": "its float y_scale output depends on x (its range) but carries no relevance",
    "test_dynamicquantizelinear_max_adjusted": "its float y_scale output depends on x but carries no relevance",
}

NOT_YET_SUPPORTED: dict[str, str] = {
    "Dropout": "training mode without its mask output (ratio 0)",
}

# distinct ops verified exact today: the coverage must not go down
MIN_EXACT_OPS = 138


@pytest.fixture(scope="module")
def outcomes():
    return {o.case: o for o in conformance.run_all()}


def test_no_silently_wrong_or_crashing_case(outcomes):
    new = {name: f"{o.status} {o.detail} {o.attnlrp}".strip() for name, o in outcomes.items()
           if conformance.failing(o) and name not in KNOWN_FAILURES}
    assert not new, "wrong or crashing ONNX node tests:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(new.items()))


@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=v))
                                  for k, v in KNOWN_FAILURES.items()])
def test_known_failure(outcomes, name):
    outcome = outcomes[name]
    assert not conformance.failing(outcome), f"{outcome.status} {outcome.detail} {outcome.attnlrp}"


def test_refusals_are_one_line_and_known(outcomes):
    refused = {o.op for o in outcomes.values() if o.status == "refused"}
    assert not refused - set(NOT_YET_SUPPORTED), "refused ops not in NOT_YET_SUPPORTED (a rule was lost?)"
    assert not set(NOT_YET_SUPPORTED) - refused, "supported now: drop them from NOT_YET_SUPPORTED"
    for o in outcomes.values():
        if o.status == "refused":
            assert "\n" not in o.detail.strip(), o.case


def test_coverage(outcomes):
    line = conformance.coverage_line(list(outcomes.values()))
    print(line)
    assert conformance.distinct_exact(conformance.per_op(list(outcomes.values()))) >= MIN_EXACT_OPS, line
