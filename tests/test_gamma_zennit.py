"""lrpc's γ-rule (--gamma-conv / --gamma-linear) against zennit's `Gamma` rule, the reference
implementation of the generalised γ-rule (the AttnLRP authors' library applies it through zennit).

zennit propagates relevance itself through the autograd graph (its hooks replace each layer's gradient
by the layer's relevance); lrpc computes a modified gradient ĝ with R = x ⊙ ĝ. On a ReLU conv net the two
agree layer by layer (ReLU passes relevance where its input is positive in both), so zennit's input
gradient is directly comparable with lrpc's relevance. Rows explain a positive and a negative logit.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lrpc  # noqa: E402

GAMMAS = (0.0, 0.05, 0.25, 100.0)
TOL = 1e-4


def _zennit():
    """zennit's modules. zennit imports torchvision for its ResNet canonizers only; torchvision has no wheel
    for this project's CPU torch build, so where it does not import, stand-ins for the two block classes
    zennit names are registered while zennit imports, and removed again (transformers probes for
    torchvision; nothing here uses the canonizers)."""
    stubs = {}
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, or a build for another torch)
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
        resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        root = types.ModuleType("torchvision")
        root.models = models
        stubs = {"torchvision": root, "torchvision.models": models, "torchvision.models.resnet": resnet}
        for name in stubs:
            sys.modules.pop(name, None)
    sys.modules.update(stubs)
    try:
        composites = pytest.importorskip("zennit.composites")
        rules = pytest.importorskip("zennit.rules")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return composites, rules


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "relevance has NaN/inf"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def zennit_relevance(module, x, target, gamma_conv, gamma_linear, gradient_x_input=False):
    """zennit's relevance of x for the logits[row, target[row]], Gamma on Conv2d and Linear layers (with
    γ None: LRP-0, zennit's Epsilon with a negligible ε, which is Gradient×Input). zennit's input gradient
    is the relevance itself; with `gradient_x_input` (a module whose backward is in ĝ form, seeded with
    ĝ = one-hot) x ⊙ that gradient is."""
    composites, rules = _zennit()
    rule = lambda g: rules.Epsilon(epsilon=1e-12) if g is None else rules.Gamma(gamma=g, stabilizer=1e-6)  # noqa
    composite = composites.LayerMapComposite(layer_map=[(nn.Conv2d, rule(gamma_conv)),
                                                        (nn.Linear, rule(gamma_linear))])
    x = x.clone().requires_grad_(True)
    with composite.context(module) as hooked:
        logits = hooked(x)
        seed = torch.zeros_like(logits)
        seed[torch.arange(len(target)), target] = 1.0
        (grad,) = torch.autograd.grad(logits, x, grad_outputs=seed if gradient_x_input else logits * seed)
    return (x * grad if gradient_x_input else grad).detach().numpy()


class ConvNet(nn.Module):
    """Convolutions with stride, padding, groups and dilation, ReLU, and a two-layer ReLU head."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
            nn.Conv2d(8, 6, (3, 2), stride=(1, 2), padding=(0, 1)), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 3, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    module = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)   # inputs of both signs
    return module, x


def _rows_pos_neg(module, x):
    """One row explaining its largest (positive) logit, one its smallest (negative) logit."""
    with torch.no_grad():
        logits = module(x).numpy()
    target = [int(np.argmax(logits[0])), int(np.argmin(logits[1]))]
    assert logits[0, target[0]] > 0 > logits[1, target[1]]
    return target


def lrpc_relevance(module, name, x, target, **options):
    explainer = lrpc.Explainer(lrpc.compile(module, {name: x}, **options))
    return explainer.explain({name: x.numpy()}, target=target).relevance[name]


@pytest.mark.parametrize("gamma", GAMMAS)
def test_conv_net_matches_zennit(conv_net, gamma):
    module, x = conv_net
    target = _rows_pos_neg(module, x)
    g_conv, g_linear = gamma, gamma / 2 + 0.01
    want = zennit_relevance(module, x, target, g_conv, g_linear)
    assert rel_err(lrpc_relevance(module, "x", x, target, gamma_conv=g_conv, gamma_linear=g_linear), want) <= TOL
    if gamma > 0:   # and γ visibly matters: plain Gradient×Input is another answer
        assert rel_err(lrpc_relevance(module, "x", x, target), want) > 1e-3


def test_gamma_layers_selector(conv_net):
    """--rule-nodes keeps the γ-rule to the matching layers: γ on the convolutions only equals zennit with
    Gamma on Conv2d and the exact gradient (LRP-0) on the Linear layers."""
    module, x = conv_net
    target = _rows_pos_neg(module, x)
    want = zennit_relevance(module, x, target, 0.25, None)
    got = lrpc_relevance(module, "x", x, target, gamma_conv=0.25, gamma_linear=0.25, rule_nodes="conv|Conv")
    assert rel_err(got, want) <= TOL


# ---- the zoo's ViT: zennit's Gamma on Conv2d / Linear, the AttnLRP rules elsewhere ---------------------

class _Convert(torch.autograd.Function):
    """Identity forward on a value v. Backward converts between lrpc's form and zennit's: `to_relevance`
    turns the modified gradient ĝ of a hooked layer's output into the relevance v ⊙ ĝ zennit expects there;
    otherwise the relevance a hooked layer returns for its input v becomes ĝ = R / v (0 where v = 0, where
    zennit's Gamma gives no relevance)."""

    @staticmethod
    def forward(ctx, v, to_relevance: bool):
        ctx.save_for_backward(v)
        ctx.to_relevance = to_relevance
        return v.clone()

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        if ctx.to_relevance:
            return grad * v, None
        return torch.where(v != 0, grad / torch.where(v != 0, v, torch.ones_like(v)), torch.zeros_like(v)), None


class ReferenceViT(nn.Module):
    """The zoo's torchvision-style ViT (models/tv_vit.py) written out with its weights: every Conv2d /
    Linear a module zennit can hook (nn.MultiheadAttention's fused in-projection split into q, k, v), and
    tests/reference_lrp.py's AttnLRP rules elsewhere (σ-frozen LayerNorm, GELU identity rule, uniform
    rule on both attention products, softmax by autograd). Gradient×Input form between layers, relevance
    inside the hooked ones (converted by _Convert)."""

    def __init__(self, vit):
        super().__init__()
        import reference_lrp as ref  # tests/ is on sys.path (pytest's prepend import mode)
        self.ref, self.vit = ref, vit
        d = vit.hidden_dim
        self.conv = vit.conv_proj
        self.blocks = nn.ModuleList()
        for layer in vit.encoder.layers:
            attention = layer.self_attention
            block = nn.Module()
            block.heads = attention.num_heads
            for name, weight, bias in zip("qkv", attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3)):
                linear = nn.Linear(d, d)
                linear.load_state_dict({"weight": weight.detach(), "bias": bias.detach()})
                setattr(block, name, linear)
            block.o = attention.out_proj
            block.fc1, block.fc2 = layer.mlp[0], layer.mlp[3]
            block.ln_1, block.ln_2 = (self._norm(n) for n in (layer.ln_1, layer.ln_2))
            self.blocks.append(block)
        self.ln = self._norm(vit.encoder.ln)
        self.head = vit.heads.head

    def _norm(self, layer_norm):
        norm = self.ref.LayerNorm(layer_norm.normalized_shape[0], eps=layer_norm.eps)
        norm.load_state_dict(layer_norm.state_dict())
        return norm

    hooked = True   # False: the plain Gradient×Input reference, for lrpc's attnlrp preset without γ

    def _layer(self, module, x):
        return _Convert.apply(module(_Convert.apply(x, False)), True) if self.hooked else module(x)

    def forward(self, pixels):
        ref, vit = self.ref, self.vit
        n = pixels.shape[0]
        x = self._layer(self.conv, pixels).flatten(2).transpose(1, 2)
        x = torch.cat([vit.class_token.expand(n, -1, -1), x], dim=1) + vit.encoder.pos_embedding
        for block in self.blocks:
            h = block.ln_1(x, lrp=True)
            b, s, d = h.shape
            split = lambda t: t.view(b, s, block.heads, d // block.heads).transpose(1, 2)  # noqa: E731
            q, k, v = (split(self._layer(getattr(block, name), h)) for name in "qkv")
            scores = ref.matmul(q, k.transpose(-1, -2), True) / math.sqrt(d // block.heads)
            mixed = ref.matmul(torch.softmax(scores, dim=-1), v, True).transpose(1, 2).reshape(b, s, d)
            x = x + self._layer(block.o, mixed)
            y = ref.gelu(self._layer(block.fc1, block.ln_2(x, lrp=True)), True)
            x = x + self._layer(block.fc2, y)
        return self._layer(self.head, self.ln(x, lrp=True)[:, 0])


@pytest.fixture(scope="module")
def vit():
    from lrpc.models import zoo
    module, inputs = zoo.get("torchvision-vit").build()
    return module, inputs["pixel_values"]


def test_reference_vit_forward_is_the_models(vit):
    module, x = vit
    with torch.no_grad():
        assert torch.allclose(ReferenceViT(module.vit)(x), module(x), atol=1e-5)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_vit_matches_zennit(vit, gamma):
    module, x = vit
    target = _rows_pos_neg(module, x)
    g_conv, g_linear = gamma, gamma / 5 + 0.01
    want = zennit_relevance(ReferenceViT(module.vit), x, target, g_conv, g_linear, gradient_x_input=True)
    got = lrpc_relevance(module, "pixel_values", x, target, gamma_conv=g_conv, gamma_linear=g_linear)
    assert rel_err(got, want) <= TOL
