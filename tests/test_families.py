"""Families outside the zoo, through lrpc.compile(torch_module): Input×Gradient equals torch autograd.

They exercise what the zoo does not: partial rotary (GPT-NeoX: slices that onnxruntime's transpose
optimizer rewrites), interleaved rotary via strided slices (GPT-J), GatherND (Falcon), and a module left
in training mode (OPT: the frontend explains the inference graph and restores each submodule's mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import lrpc
from oracles import input_x_gradient, relative_error

V = 100
FAMILIES = {
    "gptneox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 ffn_dim=64, word_embed_proj_dim=32)),
}


class Logits(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids):
        return self.hf_model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_outside_the_zoo(family):
    model_cls, config_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=V, **kwargs)
    config._attn_implementation = "eager"
    module = Logits(getattr(transformers, model_cls)(config))
    module.hf_model.eval()  # the wrapper itself stays in training mode, as users often leave it
    ids = torch.randint(3, V, (2, 7))
    explainer = lrpc.Explainer(lrpc.compile(module, {"input_ids": ids}, preset="gxi"))
    assert module.training and not module.hf_model.training  # modes restored per submodule
    attnlrp = lrpc.Explainer(lrpc.compile(module, {"input_ids": ids}))
    for seq in (7, 10):
        ids = torch.randint(3, V, (2, seq), generator=torch.Generator().manual_seed(seq))
        result = explainer.explain({"input_ids": ids.numpy()}, target=[5, 9], position=[3, -1])
        ref = input_x_gradient(module, {"input_ids": ids}, "input_ids", [5, 9], [3, seq - 1])
        assert relative_error(result.relevance["input_ids"], ref) <= 1e-4
        assert np.isfinite(attnlrp.explain({"input_ids": ids.numpy()}, target=[5, 9], position=[3, -1])
                           .relevance["input_ids"]).all()
