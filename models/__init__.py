"""lrpc.models — the model zoo (tiny deterministic transformers + the real MiniLM).

    from lrpc import models
    entry = models.get("llama")
    module, inputs = entry.build()
    proto = entry.export(exporter="dynamo")      # or lrpc.torch_export.export_onnx(module, inputs)
"""

from .zoo import (  # noqa: F401
    TASKS,
    TOWERS,
    ZOO,
    ZooEntry,
    get,
    image_inputs,
    known,
    minilm_dir,
    minilm_inputs,
    minilm_tokenizer,
    names,
    token_inputs,
)

__all__ = ["TASKS", "TOWERS", "ZOO", "ZooEntry", "get", "known", "names", "minilm_dir", "minilm_tokenizer", "minilm_inputs",
           "token_inputs", "image_inputs"]
