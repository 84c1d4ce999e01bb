"""Float models as onnxruntime users deploy them: quantized (dynamic, or static in QDQ format) and float16.

Each function reads a float32 ONNX file and writes the variant with onnxruntime's own tools, called as
its documentation shows them, so the tests and `benchmarks/quantized.py` explain what users have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

KINDS = ("dynamic", "qdq", "fp16")


def dynamic(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime.quantization.quantize_dynamic: int8 weights, DynamicQuantizeLinear + MatMulInteger /
    ConvInteger on the activations, embedding tables Gather-then-DequantizeLinear."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


def qdq(src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """onnxruntime.quantization.quantize_static in QDQ format (QuantizeLinear → DequantizeLinear pairs on
    the activations, DequantizeLinear on int8 weights), calibrated with min/max on `calibration` feeds."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return Path(dst)


def fp16(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime.transformers.float16.convert_float_to_float16: float16 weights and activations (and
    float16 float inputs / outputs)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(str(src))), str(dst))
    return Path(dst)


def make(kind: str, src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """The `kind` variant (one of KINDS) of the float model at `src`, written to `dst`."""
    if kind == "qdq":
        return qdq(src, dst, calibration)
    return {"dynamic": dynamic, "fp16": fp16}[kind](src, dst)
