"""Quantization arithmetic: scales, zero points and the quantize/dequantize round trip.

All functions are vectorised numpy and match ONNX QuantizeLinear semantics (round half to
even, saturate to the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.precision import Precision, qrange

__all__ = ["QParams", "MIN_SCALE", "grid", "INT32_BIAS_MAX", "qparams_from_range", "bias_safe_weight_scale", "quantize",
           "dequantize", "fake_quantize"]

#: Smallest scale onnxq writes: a constant or all-zero tensor gets this instead of 0, so the
#: output model never divides by zero.
MIN_SCALE = np.float32(1e-8)

#: Largest int32 bias code (the grid is symmetric: the most negative value is not used).
INT32_BIAS_MAX = 2**31 - 1

#: Head room of :func:`bias_safe_weight_scale` (onnxruntime's quantizer uses the same).
_BIAS_SCALE_MARGIN = 1.0001


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (arrays for per-channel, 0-d otherwise)."""

    scale: np.ndarray
    zero_point: np.ndarray
    precision: Precision
    axis: int | None = None
    narrow: bool = False
    reduce_range: bool = False

    @property
    def qmin(self) -> int:
        return grid(self.precision, self.narrow, self.reduce_range)[0]

    @property
    def qmax(self) -> int:
        return grid(self.precision, self.narrow, self.reduce_range)[1]


def grid(precision: Precision, narrow: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """The codes a quantizer uses: :func:`~onnxq.precision.qrange`, halved when ``reduce_range``
    (``[-64, 63]`` for int8, ``[-63, 63]`` when also narrow)."""
    qmin, qmax = qrange(precision)
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    return (qmin + 1 if narrow and qmin < 0 else qmin), qmax


def qparams_from_range(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    precision: Precision,
    symmetric: bool,
    narrow: bool = False,
    axis: int | None = None,
    reduce_range: bool = False,
) -> QParams:
    """Scale and zero point that cover ``[rmin, rmax]`` (widened to include 0).

    Symmetric quantizers use ``max(|rmin|, |rmax|)`` and put zero at the grid's centre (0 for
    signed types, the middle for unsigned ones); asymmetric ones map ``rmin`` to ``qmin``.
    """
    qmin, qmax = grid(precision, narrow, reduce_range)
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        bound = np.maximum(np.abs(lo), np.abs(hi))
        if qmin < 0:
            scale = bound / ((qmax - qmin) / 2.0) if narrow else bound / qmax
            zero = np.zeros_like(scale)
        else:
            scale = 2.0 * bound / (qmax - qmin)
            zero = np.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.maximum(scale, float(MIN_SCALE)).astype(np.float32)
    return QParams(scale=scale, zero_point=zero.astype(np.int64), precision=precision, axis=axis,
                   narrow=narrow, reduce_range=reduce_range)


def bias_safe_weight_scale(weight_scale: np.ndarray, input_scale: np.ndarray | float, bias: np.ndarray) -> np.ndarray:
    """Weight scales raised where the int32 bias scale ``s_x·s_w`` is too small for the bias.

    A channel whose weights are all zero (or tiny) gets a tiny ``s_w``; ``bias / (s_x·s_w)`` then
    overflows int32 and the bias saturates. Like onnxruntime's quantizer (which adjusts weight
    scales for int32 biases), the channel's ``s_w`` is raised just enough for its bias to fit;
    its weights are then quantized on that coarser grid. Per-tensor scales (0-d) take the
    largest ``|bias|``; per-channel ones are raised channel by channel.
    """
    scale = np.asarray(weight_scale, dtype=np.float64)
    s_x = float(np.max(np.asarray(input_scale, dtype=np.float64)))
    if not (np.isfinite(s_x) and s_x > 0) or bias.size == 0:
        return np.asarray(weight_scale, dtype=np.float32)
    magnitude = np.abs(bias.astype(np.float64))
    if scale.ndim == 0:
        magnitude = magnitude.max()
    needed = _BIAS_SCALE_MARGIN * magnitude / INT32_BIAS_MAX / s_x
    raised = np.maximum(scale, needed)
    result = raised.astype(np.float32)
    # float32 rounding must not undo the margin
    return np.where(result < raised, np.nextafter(result, np.float32(np.inf)), result).astype(np.float32)


def _broadcast(values: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * x.ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, q: QParams, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Integer codes of ``x`` saturated to the grid, as ``dtype`` (int64 unless asked; pass the
    storage type to skip the int64 array)."""
    if x.dtype == np.float32 and np.asarray(q.scale).dtype == np.float32 and max(-q.qmin, q.qmax) < 1 << 23:
        return _codes_float32(x, q).astype(dtype)
    scale = _broadcast(q.scale, x, q.axis)
    zero = _broadcast(q.zero_point, x, q.axis)
    return np.clip(np.rint(x / scale) + zero, q.qmin, q.qmax).astype(dtype)


def _codes_float32(x: np.ndarray, q: QParams) -> np.ndarray:
    """The codes of :func:`quantize` in one float32 buffer, the same values: ``x / scale`` is
    float32 either way, and every code on a grid under 2^23 is an integer float32 holds exactly
    (an out-of-grid value stays out of it and saturates). Float64 and int64 temporaries of a
    large embedding table are otherwise 6× its size."""
    out = np.asarray(np.divide(x, _broadcast(np.asarray(q.scale), x, q.axis)))  # 0-d: an array, not a scalar
    np.rint(out, out=out)
    out += _broadcast(np.asarray(q.zero_point, dtype=np.float32), x, q.axis)
    np.clip(out, q.qmin, q.qmax, out=out)
    return out


def dequantize(codes: np.ndarray, q: QParams) -> np.ndarray:
    scale = _broadcast(q.scale, codes, q.axis)
    zero = _broadcast(q.zero_point, codes, q.axis)
    return ((codes - zero) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, q: QParams) -> np.ndarray:
    """``dequantize(quantize(x))``: what the model sees after a Q/DQ pair."""
    scale = np.asarray(q.scale)
    if x.dtype == np.float32 and scale.dtype == np.float32 and max(-q.qmin, q.qmax) < 1 << 23:
        return _fake_quantize_float32(x, q)
    return dequantize(quantize(x, q), q)


def _fake_quantize_float32(x: np.ndarray, q: QParams) -> np.ndarray:
    """:func:`fake_quantize` in one float32 buffer, bit for bit the same: every code and
    ``code − zero`` is an integer float32 holds exactly, and a float32 product rounds like the
    float64 one rounded to float32. Weights of hundreds of MB otherwise make several float64
    and int64 temporaries of their size."""
    out = _codes_float32(x, q)
    out -= _broadcast(np.asarray(q.zero_point, dtype=np.float32), x, q.axis)
    out *= _broadcast(np.asarray(q.scale), x, q.axis)
    return out
