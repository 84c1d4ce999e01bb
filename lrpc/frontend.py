"""Frontends: PyTorch modules (through torch.export) and local Hugging Face folders become ONNX models
that then run through the same pipeline as any ONNX file. Offline only: local folders and the zoo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from lrpc.errors import LrpcError, require

TASKS = ("causal-lm", "sequence-classification", "feature-extraction", "sentence-similarity",
         "image-classification", "clip-image", "clip-text", "seq2seq-lm")
# transformers Auto class per task
AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
              "feature-extraction": "AutoModel", "sentence-similarity": "AutoModel",
              "image-classification": "AutoModelForImageClassification", "seq2seq-lm": "AutoModelForSeq2SeqLM",
              "clip-image": "AutoModel", "clip-text": "AutoModel"}   # a CLIP-style dual encoder: one tower each
OUTPUT_NAME = {"feature-extraction": "last_hidden_state", "clip-image": "image_embedding",
               "clip-text": "text_embedding"}


def _require_torch():
    require("torch", "transformers", purpose="exporting a PyTorch model")


def torch_to_onnx(module, example_inputs, *, exporter: str = "dynamo", opset: int | None = None,
                  dynamic: bool = True, output_names=None) -> onnx.ModelProto:
    """Trace `module(**example_inputs)` with torch.export (dynamic batch and sequence axes) into ONNX."""
    _require_torch()
    from lrpc.torch_export import ExportError, export_onnx
    if example_inputs is None:
        raise LrpcError(f"compiling a {type(module).__name__} needs example_inputs: a dict of named tensors")
    example_inputs = named_inputs(module, example_inputs)
    modes = {m: m.training for m in module.modules()}
    module.eval()  # explanations are of the inference graph: no dropout, running norm statistics
    try:
        return export_onnx(module, example_inputs, exporter=exporter, opset=opset, dynamic=dynamic,
                           output_names=output_names)
    except ExportError as exc:
        raise LrpcError(str(exc)) from None
    finally:
        for m, training in modes.items():  # each submodule back to its own mode
            m.training = training


def named_inputs(module, example_inputs) -> dict:
    """Example inputs as {forward() parameter name: tensor}; a tensor or a tuple is matched by position."""
    import inspect

    import torch
    if isinstance(example_inputs, dict):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise LrpcError("example_inputs must be a dict {name: tensor}, a tuple of tensors, or one tensor")
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(example_inputs) > len(params):
        raise LrpcError(f"{type(module).__name__}.forward takes {len(params)} positional inputs, "
                        f"{len(example_inputs)} example inputs were given")
    return {p.name: x for p, x in zip(params, example_inputs)}


def infer_task(config: dict) -> str:
    archs = " ".join(config.get("architectures") or [])
    if config.get("model_type") == "vit" or "ImageClassification" in archs:
        return "image-classification"
    if config.get("is_encoder_decoder") and ("ConditionalGeneration" in archs or "LMHead" in archs):
        return "seq2seq-lm"
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if "SequenceClassification" in archs:
        return "sequence-classification"
    return "feature-extraction"


HEAD_TASKS = ("causal-lm", "sequence-classification")   # tasks whose output layer a checkpoint may lack


def hf_module(model_dir: Path, task: str | None = None, *, hf_output: str | None = None,
              allow_random_head: bool = False):
    """A local Hugging Face folder as a torch module with plain tensor outputs, and example inputs.
    hf_output: the model output to return instead of the task's (`pooler_output`). A head the checkpoint
    lacks (transformers initialises it at random) is refused unless allow_random_head."""
    _require_torch()
    import transformers

    from lrpc import hf
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise LrpcError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_path.read_text())
    task = task or infer_task(config)
    if task not in TASKS:
        raise LrpcError(f"unknown task '{task}': choose one of {', '.join(TASKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto = getattr(transformers, AUTO_CLASS[task])
    quiet = transformers.utils.logging   # lrpc reports missing weights itself, in one line
    verbosity, bars = quiet.get_verbosity(), quiet.is_progress_bar_enabled()
    quiet.set_verbosity_error()
    quiet.disable_progress_bar()
    try:
        model, loading = auto.from_pretrained(str(model_dir), attn_implementation="eager", output_loading_info=True)
    except Exception as exc:
        raise LrpcError(f"transformers cannot load {model_dir} as {task}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        quiet.set_verbosity(verbosity)
        if bars:
            quiet.enable_progress_bar()
    model.eval()
    missing = sorted(loading.get("missing_keys") or ())
    if task in HEAD_TASKS and missing and not allow_random_head:
        raise LrpcError(f"{model_dir} has no trained weights for the {task} head ({len(missing)} missing, e.g. "
                        f"{missing[0]}): its output would be random; give the folder of a model trained for "
                        f"{task}, use --task feature-extraction, or pass --allow-random-head to explain it anyway")
    if task == "image-classification":
        size = getattr(model.config, "image_size", 224)
        return hf.HFImageModel(model), hf.image_inputs(2, size=size)
    if task == "clip-image":
        return hf.HFClipImageTower(model), hf.image_inputs(2, size=model.config.vision_config.image_size)
    if task == "clip-text":
        ids = hf.token_inputs(2, 7, vocab=model.config.text_config.vocab_size, with_mask=False)
        return hf.HFClipTextTower(model), ids
    vocab = getattr(model.config, "vocab_size", 100)
    if task == "seq2seq-lm":
        return hf.HFSeq2SeqModel(model), hf.seq2seq_inputs(2, 7, vocab=vocab)
    inputs = hf.token_inputs(2, 7, vocab=vocab)
    if task == "sentence-similarity":
        return hf.HFSentenceEmbedder(model), inputs
    return hf.HFTokenModel(model, output=hf_output or OUTPUT_NAME.get(task, "logits")), inputs


def export_hf(model: str | os.PathLike, *, task: str | None = None, output: str | os.PathLike | None = None,
              opset: int | None = None, force: bool = False, inputs=(), hf_output: str | None = None,
              allow_random_head: bool = False) -> onnx.ModelProto:
    """Export a local Hugging Face folder or a zoo name to ONNX (with `output`, written through
    lrpc.safeio; `inputs`: paths the output must not replace)."""
    from lrpc import models
    path = Path(model)
    if path.is_dir():
        module, example = hf_module(path, task, hf_output=hf_output, allow_random_head=allow_random_head)
        names = [hf_output or OUTPUT_NAME.get(task or "", "logits")]
    elif models.known(str(model)):
        entry = models.get(str(model))
        module, example = entry.build()
        names = [entry.output_name]
    else:
        raise LrpcError(f"{model} is neither a local Hugging Face folder nor a zoo model (`lrpc zoo` lists them)")
    proto = torch_to_onnx(module, example, opset=opset, output_names=names)
    if output is not None:
        import onnx_ir as ir

        from lrpc.loading import save_model
        save_model(ir.serde.deserialize_model(proto), output, force=force, inputs=inputs)
    return proto


DUAL_TOWERS = ("image", "text")   # the towers of an image–text dual encoder (CLIP)


def tower_sources(model) -> dict[str, tuple[str, str | None]] | None:
    """{tower: (model source, task)} of a dual encoder — a zoo name (lrpc.models.TOWERS) or a Hugging Face
    CLIPModel folder — else None."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    config = Path(model) / "config.json"
    if Path(model).exists():
        try:
            model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        except ValueError:
            model_type = None
        return {kind: (str(model), f"clip-{kind}") for kind in DUAL_TOWERS} if model_type == "clip" else None
    from lrpc import models
    if str(model) in models.TOWERS:
        return {kind: (entry.name, None) for kind, entry in models.TOWERS[str(model)].items()}
    return None
