"""onnxq: mixed-precision post-training quantization compiler for ONNX."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxq.api import QuantizeResult, quantize  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402

__all__ = ["__version__", "quantize", "QuantizeResult", "OnnxqError"]
