"""lrpc's γ-rule (--gamma-conv / --gamma-linear) against zennit's `Gamma` rule, the reference
implementation of the generalised γ-rule (the AttnLRP authors' library applies it through zennit).

zennit propagates relevance itself through the autograd graph (its hooks replace each layer's gradient
by the layer's relevance); lrpc computes a modified gradient ĝ with R = x ⊙ ĝ. On a ReLU conv net the two
agree layer by layer (ReLU passes relevance where its input is positive in both), so zennit's input
gradient is directly comparable with lrpc's relevance. Rows explain a positive and a negative logit.
"""

from __future__ import annotations

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


def zennit_relevance(module, x, target, gamma_conv, gamma_linear):
    """zennit's relevance of x for the logits[row, target[row]], Gamma on Conv2d and Linear layers (with
    γ None: LRP-0, zennit's Epsilon with a negligible ε, which is Gradient×Input)."""
    composites, rules = _zennit()
    rule = lambda g: rules.Epsilon(epsilon=1e-12) if g is None else rules.Gamma(gamma=g, stabilizer=1e-6)  # noqa
    composite = composites.LayerMapComposite(layer_map=[(nn.Conv2d, rule(gamma_conv)),
                                                        (nn.Linear, rule(gamma_linear))])
    x = x.clone().requires_grad_(True)
    with composite.context(module) as hooked:
        logits = hooked(x)
        seed = torch.zeros_like(logits)
        seed[torch.arange(len(target)), target] = 1.0
        (grad,) = torch.autograd.grad(logits, x, grad_outputs=logits * seed)
    return grad.detach().numpy(), logits.detach().numpy()


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


def _rows_pos_neg(logits):
    """One row explaining its largest (positive) logit, one its smallest (negative) logit."""
    target = [int(np.argmax(logits[0])), int(np.argmin(logits[1]))]
    assert logits[0, target[0]] > 0 > logits[1, target[1]]
    return target


@pytest.mark.parametrize("gamma", GAMMAS)
def test_conv_net_matches_zennit(conv_net, gamma):
    module, x = conv_net
    with torch.no_grad():
        target = _rows_pos_neg(module(x).numpy())
    g_conv, g_linear = gamma, gamma / 2 + 0.01
    want, logits = zennit_relevance(module, x, target, g_conv, g_linear)
    explainer = lrpc.Explainer(lrpc.compile(module, {"x": x}, gamma_conv=g_conv, gamma_linear=g_linear))
    got = explainer.explain({"x": x.numpy()}, target=target).relevance["x"]
    assert rel_err(got, want) <= TOL
    # zennit's Gamma is not conservative (biases absorb relevance), so the check is against zennit, and
    # differs visibly from plain Gradient×Input once γ > 0
    if gamma > 0:
        plain = lrpc.Explainer(lrpc.compile(module, {"x": x})).explain({"x": x.numpy()}, target=target)
        assert rel_err(plain.relevance["x"], want) > 1e-3


def test_gamma_layers_selector(conv_net):
    """--layers keeps the γ-rule to the matching layers: γ on the convolutions only equals zennit with
    Gamma on Conv2d and the exact gradient (LRP-0) on the Linear layers."""
    module, x = conv_net
    with torch.no_grad():
        target = _rows_pos_neg(module(x).numpy())
    want, _ = zennit_relevance(module, x, target, 0.25, None)
    compiled = lrpc.compile(module, {"x": x}, gamma_conv=0.25, gamma_linear=0.25, layers="conv|Conv")
    got = lrpc.Explainer(compiled).explain({"x": x.numpy()}, target=target).relevance["x"]
    assert rel_err(got, want) <= TOL
