"""Golden plans: a fresh plan of every zoo model and exporter must equal the stored one (models/golden/),
and the summaries must read as the architectures dictate — the check users copy into their CI."""

from __future__ import annotations

import json

import pytest

from lrpc import planio
from lrpc.compiler import plan_document
from lrpc.models import golden, names, get

CASES = [(name, exporter, opset, preset) for name in names() for exporter, opset in golden.EXPORTS
         if exporter in get(name).exporters for preset in golden.PRESETS]

L = 2  # layers of the tiny zoo models
DECODER = {"norm": 2 * L + 1, "activation": L, "softmax": L, "bilinear": 3 * L}
ENCODER = {"norm": 2 * L + 1, "activation": L, "softmax": L, "bilinear": 2 * L}
# Expected AttnLRP summaries, from each architecture's definition (not from the code under test).
EXPECTED = {
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "phi3": DECODER,
    "qwen3": {**DECODER, "norm": 2 * L + 1 + 2 * L},           # + per-layer q/k RMSNorm
    "olmo2": {**DECODER, "norm": 4 * L + 1},                   # post-norms + q/k norms + final
    "gemma3": {**DECODER, "norm": 6 * L + 1},                  # 4 norms per layer + q/k norms + final
    "gpt2": ENCODER,
    "bert": {**ENCODER, "activation": L + 1},                  # + the pooler's tanh
    "roberta": {**ENCODER, "activation": L + 1},               # + the classifier head's tanh
    "distilbert": {**ENCODER, "activation": L + 1},            # + the classifier's ReLU
    # mixture of experts: + the router's softmax, the routed product (weight × expert output) and each expert's
    # gate ⊙ up per layer; renormalised routing weights are a softmax over the chosen experts, not a norm
    "qwen3-moe": {"norm": 2 * L + 1 + 2 * L, "activation": L, "softmax": 2 * L, "bilinear": 4 * L},
    "mixtral": {"norm": 2 * L + 1, "activation": L, "softmax": 2 * L, "bilinear": 4 * L},
    "olmoe": {"norm": 2 * L + 1 + 2 * L, "activation": L, "softmax": 2 * L, "bilinear": 4 * L},  # + q/k norms
    # + the shared expert (SiLU, gate ⊙ up) and its sigmoid gate (an activation, a product)
    "qwen2-moe": {"norm": 2 * L + 1, "activation": 3 * L, "softmax": 2 * L, "bilinear": 6 * L},
    # encoder–decoder, L layers each side: encoder self-attention; decoder self- and cross-attention
    "t5": {"norm": (2 * L + 1) + (3 * L + 1), "activation": 2 * L, "softmax": 3 * L,
           "bilinear": 2 * 3 * L + 2 * L},                        # gated-GELU: gate ⊙ up per MLP
    "bart": {"norm": (1 + 2 * L) + (1 + 3 * L), "activation": 2 * L, "softmax": 3 * L,  # + layernorm_embedding
             "bilinear": 2 * 3 * L},
    "hf-vit": ENCODER, "torchvision-vit": ENCODER,
    "minilm": {"norm": 13, "activation": 6, "softmax": 6, "bilinear": 12},
    "minilm-sentence": {"norm": 14, "activation": 6, "softmax": 6, "bilinear": 12},  # + final L2 norm
}


@pytest.mark.parametrize("name,exporter,opset,preset", CASES,
                         ids=[f"{n}-{e}{o or ''}-{p}" for n, e, o, p in CASES])
def test_plan_matches_golden(name, exporter, opset, preset, zoo_export):
    _, proto = zoo_export(name, exporter, opset)
    fresh = plan_document(proto, preset)
    stored = json.loads(golden.golden_path(name, exporter, opset, preset).read_text())
    assert planio.diff(stored, fresh) == []
    if preset == "attnlrp":
        assert fresh["summary"] == EXPECTED[name]
    else:  # CP-LRP: no relevance into softmax, so Q·Kᵀ and A·V are no longer bilinear products
        assert fresh["summary"].get("softmax (no relevance)") == EXPECTED[name]["softmax"]
        assert "bilinear" not in fresh["summary"]


def test_golden_check_fails_when_a_pass_changes(zoo_export):
    """A plan that lost one norm (as if the norm pass stopped claiming it) must be reported."""
    _, proto = zoo_export("llama")
    fresh = plan_document(proto, "attnlrp")
    broken = json.loads(json.dumps(fresh))
    broken["rows"] = [r for r in broken["rows"] if r["rule"] != "frozen"][:] + \
        [r for r in broken["rows"] if r["rule"] == "frozen"][1:]
    broken["summary"]["norm"] -= 1
    assert planio.diff(fresh, broken)
