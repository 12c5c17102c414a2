"""Streaming per-tensor statistics: running min/max and a fixed-size, self-re-binning histogram.

Memory per tensor is constant (``2 * num_bins`` counters) whatever the number of samples. The
histogram covers ``[-bound, bound]`` with ``2 * num_bins`` equal bins, one edge at 0. When a new
batch exceeds ``bound``, the bound is multiplied by a power of two ``2**k`` and every ``2**k``
adjacent bins are merged — exactly, because the old edges (0 included) are a subset of the new
ones. This is the single-sweep scheme of TensorRT's / onnxruntime's ``HistogramCollector``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RunningHistogram", "TensorStats"]


class RunningHistogram:
    """Histogram of ``x`` over ``[-bound, bound]`` that grows its range by exact re-binning.

    Args:
        num_bins: bins per sign (the ``|x|`` histogram has this many bins; the signed one twice).
    """

    def __init__(self, num_bins: int) -> None:
        if num_bins < 2 or num_bins % 2:
            raise ValueError(f"num_bins must be an even number >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.counts = np.zeros(2 * self.num_bins, dtype=np.int64)
        self.bound = 0.0
        self._pending_zeros = 0

    @property
    def bin_width(self) -> float:
        """Width of one bin (0 until a non-zero value was seen)."""
        return self.bound / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """The ``2 * num_bins + 1`` bin edges of the signed histogram."""
        return np.linspace(-self.bound, self.bound, 2 * self.num_bins + 1)

    @property
    def total(self) -> int:
        """Number of values counted."""
        return int(self.counts.sum()) + self._pending_zeros

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of ``x``; all-zero data gives one bin of width 0 at 0."""
        self._flush_zeros()
        return self.counts.astype(np.float64), self.edges

    def folded(self) -> np.ndarray:
        """Counts of ``|x|`` over ``num_bins`` bins of ``[0, bound]``."""
        self._flush_zeros()
        n = self.num_bins
        return (self.counts[n:] + self.counts[:n][::-1]).astype(np.float64)

    def update(self, x: np.ndarray, absmax: float) -> None:
        """Count the values of ``x`` (finite; ``absmax`` is ``max |x|``, already computed)."""
        if x.size == 0:
            return
        if absmax == 0.0 and self.bound == 0.0:
            self._pending_zeros += int(x.size)
            return
        if self.bound == 0.0:
            self.bound = float(absmax)
        elif absmax > self.bound:
            self._grow(absmax)
        self._flush_zeros()
        n2 = 2 * self.num_bins
        idx = np.asarray(x, dtype=np.float32).reshape(-1) * np.float32(self.num_bins / self.bound)
        idx += np.float32(self.num_bins)
        np.clip(idx, 0, n2 - 1, out=idx)
        self.counts += np.bincount(idx.astype(np.intp), minlength=n2)

    def _flush_zeros(self) -> None:
        if self._pending_zeros and self.bound > 0.0:
            self.counts[self.num_bins] += self._pending_zeros
            self._pending_zeros = 0

    def _grow(self, absmax: float) -> None:
        k = max(1, math.ceil(math.log2(absmax / self.bound)))
        while self.bound * 2.0**k < absmax:
            k += 1
        n = self.num_bins
        old = np.arange(2 * n)
        new_idx = n + np.floor_divide(old - n, 1 << min(k, 62))
        self.counts = np.bincount(new_idx, weights=self.counts, minlength=2 * n).astype(np.int64)
        self.bound *= 2.0**k


@dataclass
class TensorStats:
    """Running statistics of one tensor over the calibration sweep.

    ``count`` is the number of finite values seen, or of batches for a min/max-only sweep (where
    the reduction happens inside onnxruntime); 0 means no finite value was seen. NaN and ±Inf
    values are left out of every statistic; ``non_finite`` counts the batches that had some.
    """

    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    histogram: RunningHistogram | None = field(default=None)
    non_finite: int = 0

    @property
    def absmax(self) -> float:
        """Largest ``|x|`` seen (0 before any value)."""
        if self.count == 0:
            return 0.0
        return max(abs(self.min), abs(self.max))

    def update_range(self, lo: float, hi: float) -> None:
        """Fold in a batch known only by its (finite) min and max; ``count`` then counts batches."""
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self.count += 1

    def update(self, x: np.ndarray, known: tuple[float, float] | None = None) -> tuple[float, float]:
        """Fold one batch's finite values in; returns their ``(min, max)`` (``(inf, -inf)`` if none).

        ``known`` is the batch's ``(min, max)`` when already computed (by onnxruntime) and known
        to be free of NaN/Inf.
        """
        if x.size == 0:
            return (math.inf, -math.inf)
        if known is None:
            lo, hi = float(np.min(x)), float(np.max(x))
        else:
            lo, hi = float(known[0]), float(known[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.non_finite += 1
            x = x[np.isfinite(x)]
            if x.size == 0:
                return (math.inf, -math.inf)
            lo, hi = float(np.min(x)), float(np.max(x))
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        if self.histogram is not None:
            self.histogram.update(x, max(abs(lo), abs(hi)))
        return (lo, hi)
