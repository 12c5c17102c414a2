"""Ranges of weight tensors: per-tensor or per-channel min/max, optionally MSE-clipped."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from onnxq.errors import CalibrationError
from onnxq.numerics import MIN_SCALE, QParams, qparams_from_range
from onnxq.precision import Precision, bits, is_integer, qrange

__all__ = ["COARSE", "MSE_GRID", "weight_range_method", "weight_ranges", "written_weight_ranges"]

#: Clipping factors the ``"mse"`` weight method chooses from (fractions of each channel's range).
MSE_GRID = np.linspace(0.3, 1.0, 71)

#: Stride of the coarse pass over :data:`MSE_GRID`; the fine pass tries every factor within
#: ``COARSE - 1`` grid steps of each channel's coarse best (about 23 evaluations instead of 71).
COARSE = 6


def weight_ranges(
    w: np.ndarray,
    axis: int | None,
    precision: Precision,
    symmetric: bool,
    method: str = "minmax",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (``axis``) or per-tensor ``(min, max)`` of a weight.

    Args:
        w: the float weight.
        axis: the channel axis, or ``None`` for one range (then 0-d arrays are returned).
        precision: the target precision (its grid matters for ``"mse"``).
        symmetric: whether the quantizer is symmetric (``"mse"`` scales both ends together).
        method: ``"minmax"``, or ``"mse"``: per channel, the factor ``α`` of :data:`MSE_GRID`
            whose range ``α · [min, max]`` gives the smallest fake-quantization MSE of the
            weight itself (exact, not estimated) — the usual choice for 4-bit weights.

    Returns:
        ``(mins, maxs)`` as float32 arrays of shape ``(w.shape[axis],)`` or ``()``. Channels
        whose range would give a scale below ``MIN_SCALE`` (constant or all-zero channels) are
        widened to exactly that scale.

    Raises:
        CalibrationError: ``w`` contains NaN/Inf, or ``method`` / ``axis`` is invalid.
    """
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise CalibrationError(f"weight of dtype {w.dtype} is not float", "only float weights")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise CalibrationError("weight contains NaN or Inf", "fix the model's weights")
    if w.size == 0:
        raise CalibrationError("weight is empty", "nothing to calibrate")
    if axis is not None:
        if not -w.ndim <= axis < w.ndim:
            raise CalibrationError(
                f"channel axis {axis} out of range for a weight of rank {w.ndim}",
                "pass an axis in [-rank, rank)",
            )
        axis = axis % w.ndim
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    else:
        flat = w.reshape(1, -1)
    lo = flat.min(axis=1).astype(np.float64)
    hi = flat.max(axis=1).astype(np.float64)
    if method == "mse" and is_integer(precision):
        lo, hi = _remembered_mse_clip(flat, lo, hi, precision, symmetric)
    elif method not in ("minmax", "mse"):
        raise CalibrationError(
            f"unknown weight range method {method!r}", "use 'minmax' or 'mse'"
        )
    lo, hi = _widen(lo, hi, precision, symmetric)
    if axis is None:
        return np.asarray(lo[0], dtype=np.float32), np.asarray(hi[0], dtype=np.float32)
    return lo.astype(np.float32), hi.astype(np.float32)


def weight_range_method(precision: Precision) -> str:
    """How the written weights of ``precision`` get their range: low bit widths lose most to
    outliers, so they take the MSE-optimal clipping per channel; wider grids take min/max."""
    return "mse" if bits(precision) <= 4 else "minmax"


def written_weight_ranges(
    w: np.ndarray, axis: int | None, precision: Precision, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`weight_ranges` with the method of :func:`weight_range_method`: the ranges the rewrite writes."""
    return weight_ranges(w, axis, precision, symmetric, method=weight_range_method(precision))


#: MSE clippings kept (by weight content): a run asks for the same weight's 4-bit clipping from
#: sensitivity and from every plan build that stores it at 4 bits, and on a 30k-row embedding
#: table one clipping takes seconds. The key is a digest of the bytes, so an entry never goes stale.
MSE_MEMO_ENTRIES = 256
_mse_memo: OrderedDict[tuple[str, tuple[int, ...], Precision, bool], tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _remembered_mse_clip(
    flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, precision: Precision, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    data = np.ascontiguousarray(flat)
    key = (hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest(), data.shape, precision, symmetric)
    if key in _mse_memo:
        _mse_memo.move_to_end(key)
    else:
        _mse_memo[key] = _mse_clip(data, lo, hi, precision, symmetric)
        while len(_mse_memo) > MSE_MEMO_ENTRIES:
            _mse_memo.popitem(last=False)
    best_lo, best_hi = _mse_memo[key]
    return best_lo.copy(), best_hi.copy()


def _mse_clip(
    flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, precision: Precision, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-to-fine search of the per-channel clipping factor (``COARSE`` then ``FINE`` steps)."""
    best_err = np.full(lo.shape, np.inf)
    best_alpha = np.ones(lo.shape)

    work = np.empty(flat.shape, dtype=np.float32)

    def try_alpha(alpha: np.ndarray) -> None:
        nonlocal best_err, best_alpha
        q = qparams_from_range(alpha * lo, alpha * hi, precision, symmetric, axis=0)
        err = _fake_quant_error(flat, q, work)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_alpha = np.where(better, alpha, best_alpha)

    for alpha in MSE_GRID[::COARSE]:
        try_alpha(np.full(lo.shape, alpha))
    if MSE_GRID[-1] not in MSE_GRID[::COARSE]:
        try_alpha(np.full(lo.shape, MSE_GRID[-1]))
    step = float(MSE_GRID[1] - MSE_GRID[0])
    centre = best_alpha.copy()
    for k in range(-COARSE + 1, COARSE):
        if k:
            try_alpha(np.clip(centre + k * step, MSE_GRID[0], MSE_GRID[-1]))
    return best_alpha * lo, best_alpha * hi


def _fake_quant_error(flat: np.ndarray, q: QParams, work: np.ndarray) -> np.ndarray:
    """Per-row squared error of :func:`onnxq.numerics.fake_quantize` on ``flat`` (rows =
    channels), computed in place in float32 in ``work``: the clipping search runs it some 30
    times over every weight, and on a 30k-row embedding table the float64/int64 temporaries of
    the general function cost seconds per call."""
    scale = np.asarray(q.scale, dtype=np.float32).reshape(-1, 1)
    zero = np.asarray(q.zero_point, dtype=np.float32).reshape(-1, 1)
    np.divide(flat, scale, out=work)
    np.rint(work, out=work)
    work += zero
    np.clip(work, q.qmin, q.qmax, out=work)
    work -= zero
    work *= scale
    work -= flat
    np.square(work, out=work)
    return work.sum(axis=1, dtype=np.float64)


def _widen(
    lo: np.ndarray, hi: np.ndarray, precision: Precision, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    if not is_integer(precision):
        return lo, hi
    qmin, qmax = qrange(precision)
    need = float(MIN_SCALE) * (qmax - qmin) * 1.0001
    span = np.maximum(hi, 0.0) - np.minimum(lo, 0.0)
    small = span < need
    if not small.any():
        return lo, hi
    if symmetric:
        return np.where(small, np.minimum(lo, -need / 2), lo), np.where(
            small, np.maximum(hi, need / 2), hi
        )
    base = np.minimum(lo, 0.0)
    return np.where(small, base, lo), np.where(small, base + need, hi)
