"""torchvision ``VisionTransformer`` for the zoo.

torchvision cannot be installed beside this project's CPU torch build, so unless
``import torchvision`` works, ``VisionTransformer`` here is a *structural replica* of
``torchvision.models.vision_transformer.VisionTransformer`` built from ``torch.nn`` only:
the same submodule names and classes (``conv_proj`` Conv2d patch embedding, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}`` = ``EncoderBlock`` with
``ln_1`` / ``self_attention`` (``nn.MultiheadAttention``, batch_first) / ``ln_2`` / ``mlp``
(``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout), ``encoder.ln``, ``heads.head``), the
same forward, so state dicts are interchangeable with torchvision's. ``REPLICA`` says which
one you got; ``make_vision_transformer(**kw)`` returns torchvision's class when importable, else the replica.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

try:  # pragma: no cover - torchvision is not installable beside the CPU torch build
    from torchvision.models.vision_transformer import VisionTransformer as _TVVisionTransformer

    REPLICA = False
except Exception:  # noqa: BLE001
    _TVVisionTransformer = None
    REPLICA = True


class MLPBlock(nn.Sequential):
    """torchvision.models.vision_transformer.MLPBlock (Linear, GELU, Dropout, Linear, Dropout)."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float):
        super().__init__(
            nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    def __init__(self, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                 norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                                                        norm_layer)
        self.layers = nn.Sequential(layers)
        self.ln = norm_layer(hidden_dim)

    def forward(self, input: torch.Tensor):
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """Replica of torchvision.models.vision_transformer.VisionTransformer (no conv_stem)."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout=0.0,
                 attention_dropout=0.0, num_classes=1000, representation_size=None, norm_layer=None):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length += 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                               norm_layer)
        self.seq_length = seq_length
        heads = OrderedDict()
        if representation_size is None:
            heads["head"] = nn.Linear(hidden_dim, num_classes)
        else:
            heads["pre_logits"] = nn.Linear(hidden_dim, representation_size)
            heads["act"] = nn.Tanh()
            heads["head"] = nn.Linear(representation_size, num_classes)
        self.heads = nn.Sequential(heads)
        fan_in = self.conv_proj.in_channels * self.conv_proj.kernel_size[0] * self.conv_proj.kernel_size[1]
        nn.init.trunc_normal_(self.conv_proj.weight, std=(1.0 / fan_in) ** 0.5)
        nn.init.zeros_(self.conv_proj.bias)
        # torchvision zero-initialises the head; a random head gives non-trivial logits for tests
        nn.init.normal_(self.heads.head.weight, std=0.1)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        n_h = h // p
        n_w = w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        x = x.permute(0, 2, 1)
        return x

    def forward(self, x: torch.Tensor):
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def make_vision_transformer(**kwargs) -> nn.Module:
    """torchvision's VisionTransformer if importable, else the replica (same names / forward)."""
    if _TVVisionTransformer is not None:  # pragma: no cover
        m = _TVVisionTransformer(**kwargs)
        nn.init.normal_(m.heads.head.weight, std=0.1)
        return m
    return VisionTransformer(**kwargs)


class PixelModel(nn.Module):
    """forward(pixel_values) -> self.vit(pixel_values) (torchvision models take ``x``)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values)
