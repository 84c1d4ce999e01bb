"""Hugging Face models as torch modules the exporter takes: wrappers whose forward returns ONE plain tensor
(logits, last_hidden_state or a sentence embedding), and deterministic example inputs. The torch frontend
(lrpc/frontend.py) and the model zoo (models/zoo.py) both build on these."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# wrappers: forward(input_ids, attention_mask) -> one tensor
# --------------------------------------------------------------------------------------------

class HFTokenModel(nn.Module):
    """Wraps a Hugging Face token model; returns ``logits`` (or ``last_hidden_state``) only."""

    def __init__(self, hf_model: nn.Module, *, output: str = "logits", call_kwargs: Optional[dict] = None):
        super().__init__()
        self.hf_model = hf_model
        self.output = output
        self.call_kwargs = dict(call_kwargs or {})

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **self.call_kwargs)
        return getattr(out, self.output)


class HFSeq2SeqModel(nn.Module):
    """Wraps a Hugging Face encoder–decoder (T5, BART, …); returns the decoder's ``logits`` only."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             decoder_attention_mask=decoder_attention_mask, use_cache=False, return_dict=True).logits


class HFSentenceEmbedder(nn.Module):
    """sentence-transformers pipeline: encoder → mean pooling over attention_mask → L2 norm."""

    def __init__(self, hf_model: nn.Module, *, normalize: bool = True):
        super().__init__()
        self.hf_model = hf_model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled


class HFImageModel(nn.Module):
    """Wraps a Hugging Face image classifier; forward(pixel_values) -> logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf_model(pixel_values=pixel_values, return_dict=True).logits


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def token_inputs(batch: int, seq: int, *, vocab: int, seed: int = 1234, with_mask: bool = True,
                 pad_last_row: bool = True, low: int = 3) -> dict[str, torch.Tensor]:
    """Deterministic token ids in [low, vocab) and a mask; the last row is right-padded by 2
    (when batch > 1 and seq > 3) so masking is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, seq), generator=g, dtype=torch.int64)
    out = {"input_ids": ids}
    if with_mask:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        if pad_last_row and batch > 1 and seq > 3:
            mask[-1, -2:] = 0
        out["attention_mask"] = mask
    return out


def seq2seq_inputs(batch: int, seq: int, *, vocab: int, seed: int = 1234,
                   decoder_seq: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Source ids and mask (token_inputs), and target ids and mask of another length (default seq − 2, at
    least 2; the target mask is all ones: a decoder explains a prefix it was given)."""
    source = token_inputs(batch, seq, vocab=vocab, seed=seed)
    decoder_seq = decoder_seq or max(2, seq - 2)
    target = token_inputs(batch, decoder_seq, vocab=vocab, seed=seed + 1, pad_last_row=False)
    return {**source, "decoder_input_ids": target["input_ids"], "decoder_attention_mask": target["attention_mask"]}


def image_inputs(batch: int, *, size: int, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Deterministic ``pixel_values`` [batch, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


class HFClipImageTower(nn.Module):
    """The image tower of a CLIP-style dual encoder: pixel_values -> its L2-normalised projected embedding,
    so ⟨image tower, text embedding⟩ is the model's image–text similarity (before the logit scale)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _normalised(self.hf_model.get_image_features(pixel_values=pixel_values))


class HFClipTextTower(nn.Module):
    """The text tower of a CLIP-style dual encoder: input_ids -> its L2-normalised projected embedding
    (pooled where the model pools: at the end-of-text token)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _normalised(self.hf_model.get_text_features(input_ids=input_ids))


def _normalised(features) -> torch.Tensor:
    features = getattr(features, "pooler_output", features)   # transformers ≥ 5 returns an output object
    return features / features.norm(dim=-1, keepdim=True)
