"""Precision names, candidates and the integer grids behind them."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.errors import PlanError

__all__ = [
    "Precision",
    "Candidate",
    "FP32",
    "is_integer",
    "bits",
    "qrange",
    "onnx_dtype",
    "numpy_dtype",
]


class Precision(enum.StrEnum):
    """A numeric format a tensor can be stored or computed in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT16 = "int16"
    UINT16 = "uint16"
    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    UINT4 = "uint4"
    FP8E4M3 = "fp8e4m3"


_BITS = {
    Precision.FP32: 32,
    Precision.FP16: 16,
    Precision.BF16: 16,
    Precision.INT16: 16,
    Precision.UINT16: 16,
    Precision.INT8: 8,
    Precision.UINT8: 8,
    Precision.INT4: 4,
    Precision.UINT4: 4,
    Precision.FP8E4M3: 8,
}

_INTEGER = {
    Precision.INT16,
    Precision.UINT16,
    Precision.INT8,
    Precision.UINT8,
    Precision.INT4,
    Precision.UINT4,
}

_ONNX_DTYPE = {
    Precision.FP32: onnx.TensorProto.FLOAT,
    Precision.FP16: onnx.TensorProto.FLOAT16,
    Precision.BF16: onnx.TensorProto.BFLOAT16,
    Precision.INT16: onnx.TensorProto.INT16,
    Precision.UINT16: onnx.TensorProto.UINT16,
    Precision.INT8: onnx.TensorProto.INT8,
    Precision.UINT8: onnx.TensorProto.UINT8,
    Precision.INT4: onnx.TensorProto.INT4,
    Precision.UINT4: onnx.TensorProto.UINT4,
    Precision.FP8E4M3: onnx.TensorProto.FLOAT8E4M3FN,
}


def bits(precision: Precision) -> int:
    """Storage bits per element."""
    return _BITS[precision]


def is_integer(precision: Precision) -> bool:
    """True for the integer formats that Q/DQ quantizes to."""
    return precision in _INTEGER


def qrange(precision: Precision, narrow: bool = False) -> tuple[int, int]:
    """The integer grid ``[qmin, qmax]`` of an integer precision.

    ``narrow`` drops the most negative value of a signed grid (``[-127, 127]`` for int8), which
    symmetric weight quantizers use so that ``-x`` is representable whenever ``x`` is.
    """
    if precision not in _INTEGER:
        raise ValueError(f"{precision} is not an integer precision")
    n = _BITS[precision]
    if precision.value.startswith("u"):
        return 0, (1 << n) - 1
    low = -(1 << (n - 1))
    return (low + 1 if narrow else low), (1 << (n - 1)) - 1


def onnx_dtype(precision: Precision) -> int:
    """The ``onnx.TensorProto`` element type of a precision."""
    return _ONNX_DTYPE[precision]


def numpy_dtype(precision: Precision) -> np.dtype:
    """A numpy dtype that holds the values of an integer precision (4-bit ones widen to 8)."""
    table: dict[Precision, np.dtype] = {
        Precision.INT16: np.dtype(np.int16),
        Precision.UINT16: np.dtype(np.uint16),
        Precision.INT8: np.dtype(np.int8),
        Precision.UINT8: np.dtype(np.uint8),
        Precision.INT4: np.dtype(np.int8),
        Precision.UINT4: np.dtype(np.uint8),
        Precision.FP16: np.dtype(np.float16),
        Precision.FP32: np.dtype(np.float32),
    }
    return table[precision]


_BLOCK_SUFFIX = re.compile(r"^(?P<name>[a-z0-9]+?)b(?P<block>[0-9]+)$")
_DYNAMIC_PREFIX = "dyn-"


@dataclass(frozen=True, order=True)
class Candidate:
    """A layer's ``weights/activations`` precision pair, written ``int8/uint8``.

    Two refinements are part of the word (DESIGN.md): weights quantized block-wise carry the block
    size (``int4b32/fp32``: int4 weights in blocks of 32 along the reduction axis), activations
    quantized per call by the runtime carry a ``dyn-`` prefix (``int8/dyn-uint8``: uint8 scale
    and zero point computed from each input batch, no calibrated range).

    Attributes:
        weights: storage precision of the weights.
        activations: precision the layer's input activations are quantized to (or its float
            compute format).
        block_size: weight block size; 0 when the weights are not block-wise.
        dynamic: True when the activations are quantized per call (no static Q).
    """

    weights: Precision
    activations: Precision
    block_size: int = 0
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 0 or (self.block_size and not is_integer(self.weights)):
            raise PlanError(f"block size {self.block_size} on {self.weights.value} weights",
                            "block-wise weights need an integer weight precision, e.g. int4b32")
        if self.dynamic and not is_integer(self.activations):
            raise PlanError(f"dynamic {self.activations.value} activations",
                            "per-call quantization needs an integer activation precision, e.g. dyn-uint8")

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """Parse ``"int8/uint8"``, ``"int4b32/fp32"`` or ``"int8/dyn-uint8"``; a single name
        (``"int8"``) means the same on both sides."""
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise PlanError(
                f"candidate {text!r} is not of the form weights/activations",
                "write e.g. int8/uint8, int4/int8, int4b32/fp32, int8/dyn-uint8 or fp16/fp16",
            )
        weights, block = _split_block(parts[0])
        activations, dynamic = parts[1], parts[1].startswith(_DYNAMIC_PREFIX)
        if dynamic:
            activations = activations[len(_DYNAMIC_PREFIX):]
        try:
            return cls(Precision(weights), Precision(activations), block, dynamic)
        except ValueError:
            names = " ".join(p.value for p in Precision)
            raise PlanError(
                f"candidate {text!r} names an unknown precision",
                f"known precisions: {names} (weights may end in bN, activations start with dyn-)",
            ) from None

    def __str__(self) -> str:
        block = f"b{self.block_size}" if self.block_size else ""
        dynamic = _DYNAMIC_PREFIX if self.dynamic else ""
        return f"{self.weights.value}{block}/{dynamic}{self.activations.value}"

    @property
    def is_float(self) -> bool:
        """True when neither side is an integer format (fp32/fp16/bf16 layers)."""
        return not is_integer(self.weights) and not is_integer(self.activations)

    @property
    def static_activations(self) -> bool:
        """True when the input activations get a calibrated (static) Q/DQ."""
        return is_integer(self.activations) and not self.dynamic

    @property
    def weight_bits(self) -> int:
        return bits(self.weights)

    @property
    def activation_bits(self) -> int:
        return bits(self.activations)


def _split_block(text: str) -> tuple[str, int]:
    """``"int4b32"`` → ``("int4", 32)``; a plain precision name → ``(name, 0)``."""
    if text in {p.value for p in Precision}:
        return text, 0
    match = _BLOCK_SUFFIX.match(text)
    if match is None:
        return text, 0
    return match.group("name"), int(match.group("block"))


FP32 = Candidate(Precision.FP32, Precision.FP32)
