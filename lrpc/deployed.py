"""Float models as onnxruntime users deploy them: quantized (dynamic, or static in QDQ format) and float16.

Each function reads a float32 ONNX file and writes the variant with onnxruntime's own tools, called as
its documentation shows them, so the tests and `benchmarks/quantized.py` explain what users have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

KINDS = ("dynamic", "qdq", "qoperator", "dynamic-fused", "qdq-fused", "optimized-dynamic", "fp16")


def dynamic(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime.quantization.quantize_dynamic: int8 weights, DynamicQuantizeLinear + MatMulInteger /
    ConvInteger on the activations, embedding tables Gather-then-DequantizeLinear; onnxruntime's fused
    EmbedLayerNormalization / Attention become QEmbedLayerNormalization / QAttention (their outputs, which
    onnx cannot type, are float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


def optimized_dynamic(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int) -> Path:
    """A BERT-like encoder (a legacy-exporter graph) as onnxruntime.transformers.optimizer fuses it
    (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu; it needs the head count and width to
    find the attention), then quantize_dynamic: QEmbedLayerNormalization and QAttention."""
    from onnxruntime.transformers.optimizer import optimize_model
    staged = Path(dst).with_suffix(".optimized.onnx")
    optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1,
                   use_gpu=False).save_model_to_file(str(staged))
    return dynamic(staged, dst)


def qdq(src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]], fmt: str = "QDQ") -> Path:
    """onnxruntime.quantization.quantize_static in QDQ format (QuantizeLinear → DequantizeLinear pairs on
    the activations, DequantizeLinear on int8 weights), or in QOperator format (`fmt`; pre-fused QLinearMatMul,
    QLinearAdd, … ops), calibrated with min/max on `calibration` feeds."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Feeds(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return Path(dst)


def fused_by_onnxruntime(src: str | Path, dst: str | Path) -> Path:
    """The graph onnxruntime's optimiser makes of a quantized model (ORT_ENABLE_EXTENDED, CPU), saved as users
    save it (SessionOptions.optimized_model_filepath): QDQ groups fused into QLinearMatMul, QGemm, QLinearAdd, …"""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return Path(dst)


def fp16(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime.transformers.float16.convert_float_to_float16: float16 weights and activations (and
    float16 float inputs / outputs)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(str(src))), str(dst))
    return Path(dst)


def make(kind: str, src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]],
         num_heads: int = 0, hidden_size: int = 0) -> Path:
    """The `kind` variant (one of KINDS) of the float model at `src`, written to `dst` (optimized-dynamic: of a
    model with `num_heads` heads of total width `hidden_size`)."""
    if kind == "optimized-dynamic":
        return optimized_dynamic(src, dst, num_heads, hidden_size)
    if kind in ("qdq", "qoperator"):
        return qdq(src, dst, calibration, "QDQ" if kind == "qdq" else "QOperator")
    if kind.endswith("-fused"):   # (the quantized model, then what onnxruntime's optimiser makes of it)
        staged = Path(dst).with_suffix(".unfused.onnx")
        return fused_by_onnxruntime(make(kind[:-len("-fused")], src, staged, calibration), dst)
    return {"dynamic": dynamic, "fp16": fp16}[kind](src, dst)
