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

_MASKED_ROW = "fully masked attention row: NaN relevance where the forward is finite"
_RMS_EXPANDED = "expanded RMSNormalization (reduction axes from a Range): the explainer fails in onnxruntime " \
                "(a Sum of mismatched shapes)"

KNOWN_FAILURES: dict[str, str] = {
    "test_attention_23_boolmask_fullymasked_row_nan_robustness": _MASKED_ROW,
    "test_attention_23_boolmask_fullymasked_row_nan_robustness_expanded": _MASKED_ROW,
    "test_attention_4d_causal_nonpad_negative_offset_structural_empty_expanded": _MASKED_ROW,
    "test_attention_23_fullymasked_qk_matmul_output_mode3_zero_expanded": _MASKED_ROW,
    "test_attention_24_fullymasked_qk_matmul_output_mode3_zero_expanded": _MASKED_ROW,
    "test_attention_local_window_gqa_rank4_mask_expanded": _MASKED_ROW,
    "test_reduce_l2_default_axes_keepdims_example_expanded":
        "expanded ReduceL2 on integer-valued data: relevance ~1% off the finite differences (not yet understood)",
    "test_reduce_l2_empty_set_expanded":
        "expanded ReduceL2 of an empty set: the attnlrp explainer fails in onnxruntime",
    "test_reshape_allowzero_reordered":
        "Reshape with allowzero=1 and a zero dim: the explainer fails in onnxruntime (a Mul of mismatched shapes)",
    **{f"test_rms_normalization_{case}_expanded": _RMS_EXPANDED for case in (
        "4d_axis0", "4d_axis_negative_4", "4d_axis1", "4d_axis_negative_3", "4d_axis2", "4d_axis_negative_2",
        "4d_axis3", "default_axis", "2d_axis0", "2d_axis_negative_2", "2d_axis1", "2d_axis_negative_1",
        "3d_axis0_epsilon", "3d_axis_negative_3_epsilon", "3d_axis1_epsilon", "3d_axis_negative_2_epsilon",
        "3d_axis2_epsilon", "3d_axis_negative_1_epsilon")},
}

NOT_YET_SUPPORTED: dict[str, str] = {
    "AffineGrid (expanded)": "an If with a run-time condition reading the carrying theta",
    "Attention": "inputs past_key/past_value and some masks are not supported by the decomposition",
    "CausalConvWithState": "no rule for the op itself (its expanded function body is exact)",
    "DeformConv": "no rule yet",
    "GRU": "no rule yet",
    "GridSample": "relevance into the grid (the sampling coordinates)",
    "LSTM": "no rule yet",
    "LinearAttention": "no rule yet",
    "LinearAttention (expanded)": "Scan reading a carrying tensor",
    "Loop": "a Loop reading a carrying tensor",
    "NegativeLogLikelihoodLoss": "a class weight that carries relevance is not supported",
    "RNN": "no rule yet",
    "Resize": "relevance into roi (tf_crop_and_resize) and keep_aspect_ratio_policy other than stretch",
    "Scan": "a Scan reading a carrying tensor",
    "ScatterElements": "reduction=mul is not supported",
    "ScatterND": "reduction=mul is not supported",
    "SoftmaxCrossEntropyLoss": "a class weight that carries relevance is not supported",
    "SoftmaxCrossEntropyLoss (expanded)": "NegativeLogLikelihoodLoss with a carrying class weight",
}

# distinct ops verified exact today: the coverage must not go down
MIN_EXACT_OPS = 109


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
