"""lrpc's attnlrp explainer against the independent PyTorch reference in tests/reference_lrp.py.

Each block (and a tiny decoder stack) is exported plainly (lrp=False) to ONNX with dynamic batch and
sequence axes, compiled with the attnlrp preset, and its relevance compared with input × modified
gradient of the same module run with the AttnLRP rule Functions (lrp=True): max|diff| / max|ref| ≤ 1e-4,
at batch 2, two sequence lengths, positions other than the last.
"""

from __future__ import annotations

import contextlib
import io
import logging
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lrpc  # noqa: E402

import reference_lrp as ref  # noqa: E402  (tests/ is on sys.path: pytest's default prepend import mode)

D, HEADS, HIDDEN, VOCAB, LAYERS = 16, 2, 24, 40, 2
SEQS = (5, 9)
TOL = 1e-4


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "relevance has NaN/inf"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def export(module, example, input_name="x", opset=None):
    """torch.onnx.export (dynamo) with dynamic batch and sequence axes; returns the ModelProto."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    kwargs = {} if opset is None else {"opset_version": opset}
    dim = torch.export.Dim.DYNAMIC
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=["y"],
                                    dynamo=True, dynamic_shapes=({0: dim, 1: dim},), **kwargs)
    return program.model_proto


def seeded(make, seed):
    torch.manual_seed(seed)
    return make().eval()


def targets_positions(seq, classes):
    """Two rows with different targets and positions, none of them the last position."""
    return [3 % classes, (7 * seq + 5) % classes], [1, -3 if seq > 4 else 0]


# ---- the blocks --------------------------------------------------------------------------------------

BLOCKS = {
    "attention": lambda: ref.Attention(D, HEADS, causal=True, rotary=False),
    "attention-rotary": lambda: ref.Attention(D, HEADS, causal=True, rotary=True),
    "attention-bidirectional": lambda: ref.Attention(D, HEADS, causal=False, rotary=False),
    "gated-mlp": lambda: ref.GatedMLP(D, HIDDEN, bias=True),
    "rmsnorm": lambda: ref.RMSNorm(D),
    "layernorm": lambda: ref.LayerNorm(D),
    "gelu-mlp": lambda: ref.GeluMLP(D, HIDDEN),
    "gelu-tanh-mlp": lambda: ref.GeluMLP(D, HIDDEN, approximate="tanh"),
}
# Blocks also exported at opset 18, where the exporter decomposes GELU into Erf / Tanh chains.
OPSET18 = ("gelu-mlp", "gelu-tanh-mlp")


@pytest.fixture(scope="module")
def compiled_blocks():
    cache = {}

    def get(name, opset=None, preset="attnlrp"):
        key = (name, opset, preset)
        if key not in cache:
            block = seeded(BLOCKS[name], zlib.crc32(name.encode()) % 1000)
            proto = export(ref.exportable(block), torch.randn(2, 7, D), opset=opset)
            cache[key] = block, proto, lrpc.Explainer(lrpc.compile(proto, preset=preset))
        return cache[key]
    return get


@pytest.mark.parametrize("name,opset", [(n, None) for n in BLOCKS] + [(n, 18) for n in OPSET18])
def test_block_matches_reference(compiled_blocks, name, opset):
    block, _, explainer = compiled_blocks(name, opset)
    rng = np.random.default_rng(1)
    for seq in SEQS:
        x = rng.normal(size=(2, seq, D)).astype(np.float32)
        target, position = targets_positions(seq, D)
        want, value = ref.relevance(block, torch.from_numpy(x), target, position)
        got = explainer.explain({"x": x}, target=target, position=position)
        np.testing.assert_allclose(got.logit, value.numpy(), rtol=1e-5, atol=1e-6)
        assert rel_err(got.relevance["x"], want.numpy()) <= TOL, (name, seq)


@pytest.mark.parametrize("name", ["attention-rotary", "gated-mlp", "layernorm", "gelu-mlp"])
def test_reference_rules_are_not_plain_gradient(compiled_blocks, name):
    """Guard against a vacuous comparison: on these blocks AttnLRP differs from Input×Gradient."""
    block, _, _ = compiled_blocks(name)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 6, D)).astype(np.float32))
    target, position = targets_positions(6, D)
    lrp, _ = ref.relevance(block, x, target, position, lrp=True)
    gxi, _ = ref.relevance(block, x, target, position, lrp=False)
    assert rel_err(gxi.numpy(), lrp.numpy()) > 1e-2


# ---- the decoder stack -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decoder():
    model = seeded(lambda: ref.TinyDecoder(VOCAB, D, HEADS, HIDDEN, LAYERS, rotary=True, bias=False), 7)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids, False)

    proto = export(Plain().eval(), torch.randint(0, VOCAB, (2, 7)), input_name="input_ids")
    return model, proto, {}


def decoder_explainer(decoder, preset):
    model, proto, cache = decoder
    if preset not in cache:
        cache[preset] = lrpc.Explainer(lrpc.compile(proto, preset=preset))
    return cache[preset]


def test_decoder_matches_reference(decoder):
    model = decoder[0]
    explainer = decoder_explainer(decoder, "attnlrp")
    rng = np.random.default_rng(3)
    for seq in SEQS:
        ids = rng.integers(0, VOCAB, size=(2, seq)).astype(np.int64)
        target, position = targets_positions(seq, VOCAB)
        want, value = ref.token_relevance(model, torch.from_numpy(ids), target, position)
        got = explainer.explain({"input_ids": ids}, target=target, position=position)
        np.testing.assert_allclose(got.logit, value.numpy(), rtol=1e-5, atol=1e-6)
        assert got.relevance["input_ids"].shape == ids.shape
        assert rel_err(got.relevance["input_ids"], want.numpy()) <= TOL, seq
        # the causal mask: tokens after the explained position get exactly nothing
        for row, p in enumerate(position):
            assert np.all(got.relevance["input_ids"][row, p % seq + 1:] == 0)


def test_decoder_gxi_matches_autograd(decoder):
    model = decoder[0]
    explainer = decoder_explainer(decoder, "gxi")
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(2, 6)).astype(np.int64)
    target, position = targets_positions(6, VOCAB)
    want, _ = ref.token_relevance(model, torch.from_numpy(ids), target, position, lrp=False)
    got = explainer.explain({"input_ids": ids}, target=target, position=position)
    assert rel_err(got.relevance["input_ids"], want.numpy()) <= TOL


def test_decoder_plan_summary(decoder):
    """L = 2 layers: 2L+1 RMSNorms (each one frozen Mul), L SiLU regions, L softmaxes, 3L bilinear products
    (q·kᵀ, A·v, gate ⊙ up); the rotary Muls (by constant cos/sin tables) and the norm weights are linear."""
    summary = lrpc.plan_model(decoder[1], preset="attnlrp").summary()
    assert dict(summary) == {"frozen": 2 * LAYERS + 1, "identity": LAYERS, "softmax": LAYERS,
                             "uniform": 3 * LAYERS}
    cp = lrpc.plan_model(decoder[1], preset="cp-lrp").summary()
    # CP-LRP: no relevance into the softmax; the gate ⊙ up product freezes the SiLU side; A·v is linear in v
    assert cp["none"] == LAYERS and cp["gated"] == LAYERS and cp["frozen"] == 2 * LAYERS + 1
    assert cp["identity"] == LAYERS


# ---- Linear + ReLU: attnlrp = gxi ---------------------------------------------------------------------

def test_linear_relu_attnlrp_equals_gxi():
    """On a ReLU network the identity rule ĝ_y·y/(x+ε) is the ReLU derivative (up to ε = 1e-10): attnlrp = gxi."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.ReLU(),
                              torch.nn.Linear(12, 4)).eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        proto = torch.onnx.export(net, (torch.randn(3, 10),), input_names=["x"], output_names=["y"], dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)).model_proto
    assert lrpc.plan_model(proto, preset="attnlrp").summary()["identity"] == 2
    x = np.random.default_rng(6).normal(size=(5, 10)).astype(np.float32)
    target = [0, 1, 2, 3, 1]
    a = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp")).explain({"x": x}, target=target)
    g = lrpc.Explainer(lrpc.compile(proto, preset="gxi")).explain({"x": x}, target=target)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = net(xt)
    (grad,) = torch.autograd.grad(y[torch.arange(5), target].sum(), xt)
    assert rel_err(g.relevance["x"], (xt * grad).detach().numpy()) <= 1e-5
    assert rel_err(a.relevance["x"], g.relevance["x"]) <= 1e-5


# ---- conservation --------------------------------------------------------------------------------------
# Σ_i R_i = explained value exactly (float32) where every op is conservative: bias-free linear layers,
# residual adds, norms with their statistic frozen (y = x·c is linear in x; LayerNorm's centring
# conserves: Σ_i x_i (h_i − mean h) = Σ_i (x_i − μ) h_i), the identity rule (up to ε = 1e-10) and the
# uniform rule on a bilinear product (½ Σ a ∂y/∂a + ½ Σ b ∂y/∂b = y by Euler's theorem). Absorbed:
# biases (not tested here), and the softmax: Σ_i R_in,i = Σ_i x_i R_out,i − (Σ_i x_i s_i) Σ_j R_out,j,
# which differs from Σ R_out by the softmax's "bias" term (Prop. 3.1). Under cp-lrp nothing enters the
# softmax, so a bias-free attention block is conservative; under attnlrp it is conservative up to that term.

CONSERVATIVE = {
    "rmsnorm": lambda: ref.RMSNorm(D),
    "layernorm-nobias": lambda: ref.LayerNorm(D, bias=False),
    "gated-mlp-nobias": lambda: ref.GatedMLP(D, HIDDEN, bias=False),
    "gelu-mlp-nobias": lambda: ref.GeluMLP(D, HIDDEN, bias=False),
}


@pytest.mark.parametrize("name", list(CONSERVATIVE))
def test_conservation_bias_free_blocks(name):
    block = seeded(CONSERVATIVE[name], 11)
    explainer = lrpc.Explainer(lrpc.compile(export(ref.exportable(block), torch.randn(2, 7, D))))
    x = np.random.default_rng(8).normal(size=(2, 6, D)).astype(np.float32)
    target, position = targets_positions(6, D)
    got = explainer.explain({"x": x}, target=target, position=position)
    np.testing.assert_allclose(got.conservation("x"), got.logit, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def bias_free_attention():
    block = seeded(lambda: ref.Attention(D, HEADS, causal=True, rotary=True, bias=False), 12)
    return block, export(ref.exportable(block), torch.randn(2, 7, D))


def test_conservation_attention_cp_lrp(bias_free_attention):
    block, proto = bias_free_attention
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="cp-lrp"))
    x = np.random.default_rng(9).normal(size=(2, 6, D)).astype(np.float32)
    target, position = targets_positions(6, D)
    got = explainer.explain({"x": x}, target=target, position=position)
    np.testing.assert_allclose(got.conservation("x"), got.logit, rtol=1e-4, atol=1e-5)


def test_attention_absorption_is_the_softmax_term(bias_free_attention):
    """attnlrp on bias-free attention: Σ R_x = y − (Σ R_softmax-out − Σ R_softmax-in), the softmax's absorption,
    measured on the reference (R = tensor ⊙ ĝ at the probabilities and at the unmasked scores)."""
    block, proto = bias_free_attention
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp"))
    x = np.random.default_rng(10).normal(size=(2, 6, D)).astype(np.float32)
    target, position = targets_positions(6, D)
    got = explainer.explain({"x": x}, target=target, position=position)
    block.capture = True
    try:
        xt = torch.from_numpy(x).requires_grad_(True)
        y = block(xt, True)
        y.backward(ref._seed(y, target, position))
        probs, scores = block.captured["probs"], block.captured["scores"]
        r_out = (probs * probs.grad).flatten(1).sum(1)
        r_in = (scores * scores.grad).flatten(1).sum(1)  # masked scores have ĝ = 0 exactly
    finally:
        block.capture = False
        block.captured.clear()
    absorbed = (r_out - r_in).detach().numpy()
    assert np.abs(absorbed).max() > 1e-3  # the term is real, not vacuous
    np.testing.assert_allclose(got.conservation("x"), got.logit - absorbed, rtol=1e-4, atol=1e-5)


def test_conservation_decoder_cp_lrp(decoder):
    """Bias-free decoder under cp-lrp: embeddings → logit is conservative (softmax frozen, SiLU side frozen)."""
    explainer = decoder_explainer(decoder, "cp-lrp")
    ids = np.random.default_rng(11).integers(0, VOCAB, size=(2, 7)).astype(np.int64)
    target, position = targets_positions(7, VOCAB)
    got = explainer.explain({"input_ids": ids}, target=target, position=position)
    np.testing.assert_allclose(got.conservation("input_ids"), got.logit, rtol=1e-4, atol=1e-5)
