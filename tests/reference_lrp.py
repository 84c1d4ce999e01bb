"""An independent PyTorch reference for AttnLRP (Achtibat et al. 2024), used as an oracle by the tests.

The rules are written as torch.autograd.Functions, so that input × (modified) gradient of a module run
with `lrp=True` is the AttnLRP relevance of its input (Gradient×Input form, docs/design.md, "Relevance semantics"):

- identity rule for elementwise activations (Eq. 9): ĝ_x = ĝ_y ⊙ y / (x + ε·sign(x)), ε = 1e-10, sign(0) = 1;
- uniform rule for a product of two relevance-carrying operands (Prop. 3.2/3.3): each operand gets ½ of
  its exact VJP;
- identity rule on a normalisation statistic (Prop. 3.4): the rms / std is `.detach()`ed;
- softmax rule (Prop. 3.1): in Gradient×Input form it is plain autograd through the softmax.

Linear layers keep their exact gradient (the ε-rule with ε → 0). The blocks below take `lrp=False` for
the plain forward (what is exported to ONNX) and `lrp=True` for the rule-modified forward; both compute
the same values. Nothing here imports lrpc.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATION_EPS = 1e-10


# ---- rules as autograd Functions -----------------------------------------------------------------

class _IdentityRule(torch.autograd.Function):
    """y = f(x); backward ĝ_x = ĝ_y ⊙ y / (x + ε·sign(x)) with sign(0) = 1 (AttnLRP Eq. 9)."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        eps = torch.where(x >= 0, torch.full_like(x, ACTIVATION_EPS), torch.full_like(x, -ACTIVATION_EPS))
        return grad * y / (x + eps), None


def identity_rule(fn, x):
    return _IdentityRule.apply(x, fn)


def _sum_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Undo broadcasting: sum `grad` down to `shape`."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


class _UniformMatMul(torch.autograd.Function):
    """y = a @ b with both operands carrying relevance: ĝ_a = ½ ĝ_y bᵀ, ĝ_b = ½ aᵀ ĝ_y (Prop. 3.2/3.3)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = 0.5 * grad
        return _sum_to(grad @ b.transpose(-1, -2), a.shape), _sum_to(a.transpose(-1, -2) @ grad, b.shape)


class _UniformMul(torch.autograd.Function):
    """y = a ⊙ b with both operands carrying relevance: each gets ½ of its exact VJP (Prop. 3.3)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = 0.5 * grad
        return _sum_to(grad * b, a.shape), _sum_to(grad * a, b.shape)


def matmul(a, b, lrp: bool):
    return _UniformMatMul.apply(a, b) if lrp else a @ b


def mul(a, b, lrp: bool):
    return _UniformMul.apply(a, b) if lrp else a * b


def gelu(x, lrp: bool, approximate: str = "none"):
    fn = lambda v: F.gelu(v, approximate=approximate)  # noqa: E731
    return identity_rule(fn, x) if lrp else fn(x)


def silu(x, lrp: bool):
    return identity_rule(F.silu, x) if lrp else F.silu(x)


# ---- blocks ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x · 1/sqrt(mean(x²) + eps) · w; with lrp the rms is frozen (Prop. 3.4)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(d))
        self.eps = eps

    def forward(self, x, lrp: bool = False):
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (inv.detach() if lrp else inv) * self.weight


class LayerNorm(nn.Module):
    """(x − μ)/σ · w + b; exported plainly as F.layer_norm (the LayerNormalization op). With lrp σ is frozen:
    relevance flows through the centring x − μ only (Prop. 3.4)."""

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d)) if bias else None
        self.eps = eps

    def forward(self, x, lrp: bool = False):
        if not lrp:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        centred = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps).detach()
        y = centred / std * self.weight
        return y if self.bias is None else y + self.bias


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q kᵀ/√d_h + causal −inf mask) v, optional rotary embedding.
    With lrp, both q·kᵀ and A·v use the uniform rule (so q, k end with ¼, v with ½) and the softmax is
    plain autograd (the softmax rule)."""

    def __init__(self, d: int, heads: int, causal: bool = True, rotary: bool = False, bias: bool = True):
        super().__init__()
        self.d, self.heads, self.dh = d, heads, d // heads
        self.causal, self.rotary = causal, rotary
        self.q, self.k = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.v, self.o = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.dh, 2).float() / self.dh))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.captured: dict[str, torch.Tensor] = {}
        self.capture = False

    def _rope(self, x, seq: int):
        t = torch.arange(seq, dtype=torch.float32, device=x.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos() + _rotate_half(x) * emb.sin()

    def forward(self, x, lrp: bool = False):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.rotary:
            q, k = self._rope(q, s), self._rope(k, s)
        scores = matmul(q, k.transpose(-1, -2), lrp) * (1.0 / math.sqrt(self.dh))
        if self.capture:
            scores.retain_grad()
            self.captured["scores"] = scores
        if self.causal:
            keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.capture:
            probs.retain_grad()
            self.captured["probs"] = probs
        out = matmul(probs, v, lrp).transpose(1, 2).reshape(b, s, self.d)
        return self.o(out)


class GatedMLP(nn.Module):
    """down(SiLU(gate(x)) ⊙ up(x)): identity rule on the SiLU, uniform rule on the gating product."""

    def __init__(self, d: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=bias), nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias)

    def forward(self, x, lrp: bool = False):
        return self.down(mul(silu(self.gate(x), lrp), self.up(x), lrp))


class GeluMLP(nn.Module):
    """fc2(GELU(fc1(x))): identity rule on the GELU (its input includes fc1's bias)."""

    def __init__(self, d: int, hidden: int, bias: bool = True, approximate: str = "none"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden, bias=bias), nn.Linear(hidden, d, bias=bias)
        self.approximate = approximate

    def forward(self, x, lrp: bool = False):
        return self.fc2(gelu(self.fc1(x), lrp, self.approximate))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, rotary: bool, bias: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, heads, causal=True, rotary=rotary, bias=bias)
        self.mlp = GatedMLP(d, hidden, bias=bias)

    def forward(self, x, lrp: bool = False):
        x = x + self.attn(self.norm1(x, lrp), lrp)
        return x + self.mlp(self.norm2(x, lrp), lrp)


class TinyDecoder(nn.Module):
    """embedding → [RMSNorm → attention → residual → RMSNorm → gated MLP → residual] × L → RMSNorm → lm head."""

    def __init__(self, vocab: int = 40, d: int = 16, heads: int = 2, hidden: int = 24, layers: int = 2,
                 rotary: bool = True, bias: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, hidden, rotary, bias) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def from_embeddings(self, h, lrp: bool = False):
        for layer in self.layers:
            h = layer(h, lrp)
        return self.head(self.norm(h, lrp))

    def forward(self, input_ids, lrp: bool = False):
        return self.from_embeddings(self.embed(input_ids), lrp)


class _Lrp(nn.Module):
    """Wraps a block so that its plain forward (lrp=False) is what torch.onnx.export sees."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, False)


def exportable(block: nn.Module) -> nn.Module:
    return _Lrp(block).eval()


# ---- reference relevance ----------------------------------------------------------------------------

def _seed(y: torch.Tensor, target, position=None) -> torch.Tensor:
    """One-hot ĝ at y[b, (position,) target] for every row b; negative positions count from the end."""
    seed = torch.zeros_like(y)
    for row, t in enumerate(target):
        if y.dim() == 3:
            seed[row, int(position[row]), int(t)] = 1.0
        else:
            seed[row, int(t)] = 1.0
    return seed


def relevance(block: nn.Module, x: torch.Tensor, target, position=None, lrp: bool = True):
    """(R_x = x ⊙ ĝ_x, explained values) for a block that takes a float tensor."""
    x = x.detach().clone().requires_grad_(True)
    y = block(x, lrp)
    seed = _seed(y, target, position)
    (grad,) = torch.autograd.grad(y, x, seed)
    return (x * grad).detach(), (y * seed).flatten(1).sum(1).detach()


def token_relevance(model: TinyDecoder, ids: torch.Tensor, target, position, lrp: bool = True):
    """(one relevance per token = embedding-output relevance summed over hidden, explained values)."""
    h = model.embed(ids).detach().requires_grad_(True)
    y = model.from_embeddings(h, lrp)
    seed = _seed(y, target, position)
    (grad,) = torch.autograd.grad(y, h, seed)
    return (h * grad).sum(-1).detach(), (y * seed).flatten(1).sum(1).detach()


# ---- transformers' Qwen3-MoE run with the AttnLRP rules ------------------------------------------------

def _rms_norm_frozen(self, x):
    """Qwen3MoeRMSNorm with the rms a constant (Prop. 3.4)."""
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * (x * inv.detach())


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """transformers' eager attention with the uniform rule on Q·Kᵀ and A·V (grouped K/V heads repeated)."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = matmul(query, key.transpose(2, 3), True) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return matmul(probs, value, True).transpose(1, 2).contiguous(), probs


def _experts(self, hidden, top_k_index, top_k_weights):
    """Each expert on the tokens routed to it: down(SiLU(gate) ⊙ up) with the identity rule on SiLU and the
    uniform rule on the gating product, then × the routing weight with the uniform rule again."""
    out = torch.zeros_like(hidden)
    for expert in range(self.num_experts):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = F.linear(mul(silu(gate, True), up, True), self.down_proj[expert])
        out = out.index_add(0, token, mul(expert_out, top_k_weights[token, slot, None], True))
    return out


@contextlib.contextmanager
def qwen3_moe_attnlrp():
    """Within the block, transformers' Qwen3-MoE runs with the AttnLRP rules that LXT's `qwen3_moe` map
    applies (written here from the rules, not from its code): RMSNorm (also on q/k) with a frozen rms,
    attention with uniform Q·Kᵀ and A·V and a plain softmax, experts as above; the router (softmax, top-k,
    renormalisation of the chosen weights) keeps its exact gradient, as LXT leaves it unpatched."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qm

    with _patched([(qm.Qwen3MoeRMSNorm, "forward", _rms_norm_frozen), (qm, "eager_attention_forward", _attention),
                   (qm.Qwen3MoeExperts, "forward", _experts)]):
        yield


@contextlib.contextmanager
def _patched(patches):
    """setattr(owner, name, fn) for each (owner, name, fn) within the block, restored after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, fn in patches:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _llama_mlp(self, x):
    """LlamaMLP: down(SiLU(gate) ⊙ up), identity rule on the SiLU, uniform rule on the gating product."""
    return self.down_proj(mul(silu(self.gate_proj(x), True), self.up_proj(x), True))


@contextlib.contextmanager
def llama_attnlrp():
    """Within the block, transformers' Llama runs with the AttnLRP rules: RMSNorm with a frozen rms, attention
    with uniform Q·Kᵀ and A·V and a plain softmax (grouped K/V heads repeated by repeat_interleave, not by the
    model's own repeat_kv), the gated MLP as above."""
    from transformers.models.llama import modeling_llama as lm

    with _patched([(lm.LlamaRMSNorm, "forward", _rms_norm_frozen), (lm, "eager_attention_forward", _attention),
                   (lm.LlamaMLP, "forward", _llama_mlp)]):
        yield


def embedding_relevance(module, inputs: dict, target, position, rules):
    """Σ_hidden E ⊙ ĝ_E of a zoo Hugging Face model's embedding output, run within `rules` (a context manager
    above, e.g. llama_attnlrp()), for y[b, position[b], target[b]] of every row b."""
    captured = {}

    def keep(_mod, _args, output):
        output.retain_grad()
        captured["E"] = output
    handle = module.hf_model.get_input_embeddings().register_forward_hook(keep)
    try:
        with rules:
            y = module(**inputs)
        rows = torch.arange(y.shape[0])
        y[rows, torch.as_tensor(position), torch.as_tensor(target)].sum().backward()
    finally:
        handle.remove()
    E = captured["E"]
    return (E * E.grad).sum(-1).detach().numpy()
