"""More vision families through the same passes, tiny Hugging Face configs with random weights (offline):
DeiT (class and distillation tokens, two heads averaged), Swin (windowed and shifted-window attention with
relative position bias, patch merging) and ConvNeXt (depthwise 7×7 convolutions, LayerNorm over channels,
layer scale). gxi equals torch autograd (x ⊙ ∂logit/∂x, ≤ 1e-4 relative), and the AttnLRP plan assigns
the rules each architecture calls for.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import lrpc  # noqa: E402
from lrpc.frontend import torch_to_onnx  # noqa: E402

TOL = 1e-4
TARGET = [1, 3]


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def deit():
    config = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def swin():
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                     window_size=4, num_labels=5)
    return transformers.SwinForImageClassification(config)


def convnext():
    config = transformers.ConvNextConfig(patch_size=4, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                         image_size=32, num_labels=5)
    return transformers.ConvNextForImageClassification(config)


# name → (builder, exporter, AttnLRP rule counts). Swin goes through the legacy exporter: torch.export
# cannot trace its window attention (a view of a non-contiguous tensor).
FAMILIES = {
    # 2 layers: 2 LayerNorms each + the final one; GELU per layer; per layer a softmax and 2 products
    "deit": (deit, "dynamo", {"layernorm-frozen-std": 5, "identity": 2, "softmax": 2, "uniform": 4}),
    # 4 blocks: 2 LayerNorms each + embedding, patch merging and final LayerNorms
    "swin": (swin, "legacy", {"layernorm-frozen-std": 11, "identity": 4, "softmax": 4, "uniform": 8}),
    # 2 blocks (LayerNorm, GELU each) + the stem's, the downsampling's and the final LayerNorm; no attention
    "convnext": (convnext, "dynamo", {"layernorm-frozen-std": 5, "identity": 2}),
}


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(name):
        if name not in cache:
            build, exporter, _ = FAMILIES[name]
            torch.manual_seed(0)
            module = Logits(build().eval())
            x = torch.randn(2, 3, 32, 32)
            cache[name] = module, x, torch_to_onnx(module, {"pixel_values": x}, exporter=exporter)
        return cache[name]
    return get


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "relevance has NaN/inf"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attnlrp_plan(exported, name):
    _, _, proto = exported(name)
    assert dict(lrpc.plan_model(proto).summary()) == FAMILIES[name][2]


@pytest.mark.parametrize("name", ["deit", "convnext", "swin"])
def test_gxi_equals_autograd(exported, name):
    module, x, proto = exported(name)
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="gxi"))
    got = explainer.explain({"pixel_values": x.numpy()}, target=TARGET).relevance["pixel_values"]
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(xx)[torch.arange(2), TARGET].sum(), xx)
    assert rel_err(got, (xx * grad).detach().numpy()) <= TOL
