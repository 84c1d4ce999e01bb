"""A CLIP-style dual encoder (Hugging Face `CLIPModel`, tiny random config built offline) explained through a
vector seed: the similarity of one tower's normalised embedding to the other tower's, s = ⟨e_image, e_text⟩.

One explainer per tower: the image tower with seed = e_text explains s over the pixels, the text tower with
seed = e_image explains it over the tokens. gxi is checked against torch autograd (x ⊙ ∂s/∂x; a token's
relevance is its embedding row ⊙ the gradient there, summed), the AttnLRP plan of both towers is checked
rule by rule. (Σ relevance of the input is not s: biases, the class and position embeddings take their share.)
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import lrpc  # noqa: E402
from lrpc.frontend import torch_to_onnx  # noqa: E402

LAYERS, TOL = 2, 1e-4


def tower_config(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                projection_dim=16, **extra)


class Tower(nn.Module):
    """One tower of a CLIPModel: its input → the L2-normalised projected embedding."""

    def __init__(self, clip, kind: str):
        super().__init__()
        self.clip, self.kind = clip, kind

    def forward(self, x):
        if self.kind == "image":
            e = self.clip.get_image_features(pixel_values=x)
        else:
            e = self.clip.get_text_features(input_ids=x)
        e = getattr(e, "pooler_output", e)   # transformers ≥ 5 returns an output object
        return e / e.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def clip():
    config = transformers.CLIPConfig(
        text_config=tower_config(vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=63),
        vision_config=tower_config(image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 63, (2, 7))
    ids[:, -1] = 63   # end-of-text token, where the text tower pools
    towers = {"image": (Tower(model, "image"), "x", pixels), "text": (Tower(model, "text"), "x", ids)}
    with torch.no_grad():
        embeddings = {k: tower(x) for k, (tower, _, x) in towers.items()}
    return model, towers, embeddings


def autograd_relevance(model, tower, x, seed):
    """x ⊙ ∂⟨seed, tower(x)⟩/∂x for pixels; for tokens, the token-embedding rows ⊙ their gradient, summed."""
    if tower.kind == "image":
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((tower(x) * seed).sum(), x)
        return (x * grad).detach().numpy()
    captured = {}
    hook = model.text_model.embeddings.token_embedding.register_forward_hook(
        lambda module, args, out: captured.setdefault("e", out.retain_grad() or out))
    try:
        (tower(x) * seed).sum().backward()
    finally:
        hook.remove()
    e = captured["e"]
    return (e * e.grad).sum(-1).detach().numpy()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "relevance has NaN/inf"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_gxi_equals_autograd_on_each_tower(clip, kind):
    model, towers, embeddings = clip
    tower, name, x = towers[kind]
    other = embeddings["text" if kind == "image" else "image"]
    explainer = lrpc.Explainer(lrpc.compile(tower, {name: x}, preset="gxi", seed="vector"))
    result = explainer.explain({name: x.numpy()}, seed=other.numpy())
    similarity = (embeddings[kind] * other).sum(-1).numpy()
    np.testing.assert_allclose(result.logit, similarity, rtol=1e-4, atol=1e-6)
    assert rel_err(result.relevance[name], autograd_relevance(model, tower, x, other)) <= TOL


@pytest.mark.parametrize("kind", ["image", "text"])
def test_attnlrp_plan_and_conservation_on_each_tower(clip, kind):
    """Each tower's plan has the AttnLRP rules of a pre-norm encoder: per layer one softmax, two uniform
    attention products, two σ-frozen LayerNorms and one activation region (quick-GELU: x·σ(1.702x)); plus
    the tower's outer LayerNorms (vision: before and after the encoder; text: after it), and the final L2
    normalisation, a Div whose norm is frozen. The explained value is the similarity itself."""
    model, towers, embeddings = clip
    tower, name, x = towers[kind]
    other = embeddings["text" if kind == "image" else "image"]
    proto = torch_to_onnx(tower, {name: x})
    counts = lrpc.plan_model(proto).summary()
    norms = 2 * LAYERS + (2 if kind == "image" else 1)   # vision: pre-LN before the encoder too
    assert counts["softmax"] == LAYERS and counts["uniform"] == 2 * LAYERS
    assert counts["layernorm-frozen-std"] == norms and counts["identity"] == LAYERS, counts
    assert counts["frozen"] == 1, counts
    explainer = lrpc.Explainer(lrpc.compile(proto, seed="vector"))
    result = explainer.explain({name: x.numpy()}, seed=other.numpy())
    assert np.all(np.isfinite(result.relevance[name]))
    np.testing.assert_allclose(result.logit, (embeddings[kind] * other).sum(-1).numpy(), rtol=1e-4, atol=1e-6)
