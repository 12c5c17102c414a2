"""Choosing a clipping range from a tensor's streaming statistics, per method and bit width.

Every function takes a :class:`~onnxq.calibration.histogram.TensorStats` and returns
``(lo, hi)`` inside the observed ``[min, max]``; :func:`safe_range` then widens degenerate
ranges. All searches are vectorised over the candidate thresholds.

Conventions: a *symmetric* quantizer covers ``[-T, T]``; an asymmetric quantizer on one-signed
data (e.g. after ReLU) puts all ``2**bits`` levels on that side; an asymmetric quantizer on
data of both signs is searched over the lower and upper ends independently (MSE) or, for the
percentile method, takes each tail separately; entropy always works on ``|x|``.
"""

from __future__ import annotations

import math

import numpy as np

from onnxq.calibration.histogram import TensorStats
from onnxq.numerics import MIN_SCALE
from onnxq.precision import Precision, is_integer, qrange

__all__ = [
    "entropy_range",
    "levels",
    "lp_range",
    "minmax_range",
    "mse_range",
    "percentile_range",
    "safe_range",
]


def levels(precision: Precision, symmetric: bool, one_sided: bool) -> int:
    """Number of quantization levels that fall on the covered side(s) of ``|x|``.

    ``2**bits`` for an asymmetric quantizer of one-signed data, ``2**(bits-1)`` otherwise (the
    128 levels TensorRT uses for 8 bits).
    """
    qmin, qmax = qrange(precision)
    n = qmax - qmin + 1
    return n if (one_sided and not symmetric) else n // 2


def _one_sided(stats: TensorStats) -> bool:
    return stats.min >= 0.0 or stats.max <= 0.0


def minmax_range(stats: TensorStats) -> tuple[float, float]:
    """The observed ``[min, max]``."""
    return float(stats.min), float(stats.max)


def _clamp(stats: TensorStats, lo: float, hi: float) -> tuple[float, float]:
    return max(float(lo), float(stats.min)), min(float(hi), float(stats.max))


def _from_abs(stats: TensorStats, threshold: float) -> tuple[float, float]:
    return _clamp(stats, -threshold, threshold)


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The ``q``-quantile (0..1) of histogram data, linear inside the bin."""
    cdf = np.cumsum(counts)
    total = cdf[-1]
    if total <= 0:
        return float(edges[0])
    target = q * total
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, len(counts) - 1)
    below = cdf[i - 1] if i > 0 else 0.0
    frac = 0.0 if counts[i] <= 0 else (target - below) / counts[i]
    return float(edges[i] + np.clip(frac, 0.0, 1.0) * (edges[i + 1] - edges[i]))


def percentile_range(stats: TensorStats, symmetric: bool, percentile: float) -> tuple[float, float]:
    """Clip at the ``percentile`` of ``|x|`` (symmetric) or at both tails of ``x``."""
    hist = stats.histogram
    if hist is None or hist.bound == 0.0:
        return minmax_range(stats)
    q = percentile / 100.0
    if symmetric or _one_sided(stats):
        folded = hist.folded()
        edges = np.linspace(0.0, hist.bound, hist.num_bins + 1)
        return _from_abs(stats, _quantile(folded, edges, q))
    counts, edges = hist.signed()
    return _clamp(stats, _quantile(counts, edges, 1.0 - q), _quantile(counts, edges, q))


def entropy_range(stats: TensorStats, precision: Precision, symmetric: bool) -> tuple[float, float]:
    """TensorRT's KL-divergence threshold on the ``|x|`` histogram.

    For each candidate threshold ``t`` (in bins, from the number of levels ``L`` to all bins)
    the reference ``P`` is the histogram up to ``t`` with the outliers added to its last bin;
    ``Q`` merges the same bins (without outliers) into ``L`` levels and spreads each level
    evenly over its non-empty bins. The threshold minimising ``KL(P || Q)`` wins. The bin at 0
    takes the count of its neighbour (zeros are exact; their spike would dominate). Computed with
    prefix sums, so all candidates cost ``O(candidates * L)``.
    """
    hist = stats.histogram
    if hist is None or hist.bound == 0.0:
        return minmax_range(stats)
    nq = levels(precision, symmetric, _one_sided(stats))
    h = hist.folded()
    n = h.size
    # the spike of (exact) zeros after ReLU would dominate KL and force a tiny threshold, yet 0 is
    # always on the grid; like NVIDIA's pytorch-quantization, the first bin takes its neighbour's count
    h[0] = h[1]
    if nq >= n:
        return minmax_range(stats)
    last_used = int(np.nonzero(h)[0][-1]) + 1
    t = np.arange(nq, n + 1)
    t = t[t <= max(last_used, nq)]
    zero = np.zeros(1)
    c0 = np.concatenate([zero, np.cumsum(h)])
    nz = np.concatenate([zero, np.cumsum(h > 0)])
    cl = np.concatenate([zero, np.cumsum(_xlogx(h))])
    total = c0[-1]

    outliers = total - c0[t]
    h_last = h[t - 1]
    p_last = h_last + outliers
    sum_plogp = cl[t] - _xlogx(h_last) + _xlogx(p_last)

    width = t // nq
    chunk = np.arange(nq)
    starts = chunk[None, :] * width[:, None]
    ends = starts + width[:, None]
    ends[:, -1] = t
    s = c0[ends] - c0[starts]
    cnt = nz[ends] - nz[starts]
    cnt[:, -1] += ((h_last == 0) & (outliers > 0)).astype(cnt.dtype)
    p_chunk = s.copy()
    p_chunk[:, -1] += outliers
    ok = cnt > 0
    bad = (ok & (s <= 0) & (p_chunk > 0)).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logq = np.where(ok & (s > 0), np.log(np.where(s > 0, s, 1.0) / np.maximum(cnt, 1)), 0.0)
    sum_plogq = (p_chunk * logq).sum(axis=1)
    q_total = c0[t]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (sum_plogp - sum_plogq) / total - math.log(total) + np.log(q_total)
    kl = np.where(bad | ~np.isfinite(kl), np.inf, kl)
    if not np.isfinite(kl).any():
        return minmax_range(stats)
    best = int(t[int(np.argmin(kl))])
    return _from_abs(stats, best * hist.bin_width)


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _step(lo: np.ndarray, hi: np.ndarray, precision: Precision, symmetric: bool) -> np.ndarray:
    """Quantization step of candidate ranges, as :func:`onnxq.numerics.qparams_from_range`."""
    qmin, qmax = qrange(precision)
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    if symmetric:
        bound = np.maximum(-lo, hi)
        return bound / qmax if qmin < 0 else 2.0 * bound / (qmax - qmin)
    return (hi - lo) / (qmax - qmin)


def mse_range(stats: TensorStats, precision: Precision, symmetric: bool) -> tuple[float, float]:
    """The clipping range minimising the expected quantization MSE on the histogram.

    Expected error of a range ``[a, b]`` with step ``Δ``: the squared clipping error of every
    bin centre outside ``[a, b]`` plus ``Δ²/12`` rounding noise per value inside, except that
    values within ``Δ/2`` of 0 (which is always on the grid) cost their own square. Closed form
    through prefix sums of ``h``, ``h·c`` and ``h·c²``; symmetric and one-signed data search
    every bin edge, two-signed asymmetric data a 128 × 128 grid of lower and upper ends.
    """
    hist = stats.histogram
    if hist is None or hist.bound == 0.0:
        return minmax_range(stats)
    counts, edges = hist.signed()
    centres = 0.5 * (edges[:-1] + edges[1:])
    zero = np.zeros(1)
    h0 = np.concatenate([zero, np.cumsum(counts)])
    h1 = np.concatenate([zero, np.cumsum(counts * centres)])
    h2 = np.concatenate([zero, np.cumsum(counts * centres**2)])
    n = hist.num_bins
    w = hist.bin_width
    k_pos = min(n, math.ceil(max(stats.max, 0.0) / w - 1e-9))
    k_neg = min(n, math.ceil(max(-stats.min, 0.0) / w - 1e-9))

    def cost(ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
        a = -ka * w
        b = kb * w
        ia = n - ka
        ib = n + kb
        low = h2[ia] - 2 * a * h1[ia] + a * a * h0[ia]
        high = (h2[-1] - h2[ib]) - 2 * b * (h1[-1] - h1[ib]) + b * b * (h0[-1] - h0[ib])
        step = _step(a, b, precision, symmetric)
        # values within step/2 of 0 round to 0 (always on the grid): their error is c², not
        # the uniform-noise step²/12 of the other in-range values
        kd = np.floor(step / 2.0 / w).astype(np.int64)
        d_lo = n - np.minimum(kd, ka)
        d_hi = n + np.minimum(kd, kb)
        dead = h0[d_hi] - h0[d_lo]
        dead_sq = h2[d_hi] - h2[d_lo]
        inside = h0[ib] - h0[ia] - dead
        return low + high + inside * step**2 / 12.0 + dead_sq

    if symmetric:
        ka = kb = np.arange(1, max(k_pos, k_neg, 1) + 1)
    elif stats.min >= 0.0:
        kb = np.arange(1, max(k_pos, 1) + 1)
        ka = np.zeros_like(kb)
    elif stats.max <= 0.0:
        ka = np.arange(1, max(k_neg, 1) + 1)
        kb = np.zeros_like(ka)
    else:
        grid_a = np.unique(np.linspace(1, k_neg, min(k_neg, 128)).round().astype(np.int64))
        grid_b = np.unique(np.linspace(1, k_pos, min(k_pos, 128)).round().astype(np.int64))
        ka, kb = (g.reshape(-1) for g in np.meshgrid(grid_a, grid_b, indexing="ij"))
    err = cost(ka, kb)
    i = int(np.argmin(err))
    return _clamp(stats, -ka[i] * w, kb[i] * w)


def lp_range(
    stats: TensorStats,
    precision: Precision,
    symmetric: bool,
    p: float,
    candidates: int = 200,
) -> tuple[float, float]:
    """The range ``α · [lo, hi]`` (α in (0, 1]) minimising the expected ``Lp`` error.

    ``lo, hi`` are the observed ends (``±absmax`` when symmetric); the error is ``|c - clip(c)|^p``
    outside and ``(Δ/2)^p / (p + 1)`` (uniform rounding noise) inside. LAPQ's initial ranges.
    """
    hist = stats.histogram
    if hist is None or hist.bound == 0.0:
        return minmax_range(stats)
    counts, edges = hist.signed()
    centres = 0.5 * (edges[:-1] + edges[1:])
    keep = counts > 0
    counts, centres = counts[keep], centres[keep]
    if symmetric:
        lo0, hi0 = -stats.absmax, stats.absmax
    else:
        lo0, hi0 = min(stats.min, 0.0), max(stats.max, 0.0)
    alpha = np.linspace(1.0 / candidates, 1.0, candidates)
    a = alpha * lo0
    b = alpha * hi0
    step = _step(a, b, precision, symmetric)
    clipped = np.clip(centres[None, :], a[:, None], b[:, None])
    out = np.abs(centres[None, :] - clipped) ** p
    noise = ((step / 2.0) ** p / (p + 1.0))[:, None]
    inside = (centres[None, :] >= a[:, None]) & (centres[None, :] <= b[:, None])
    err = (np.where(inside, noise, out) * counts[None, :]).sum(axis=1)
    i = int(np.argmin(err))
    return _clamp(stats, a[i], b[i])


def safe_range(
    lo: float, hi: float, precision: Precision, symmetric: bool
) -> tuple[float, float]:
    """Widen a degenerate range so that its scale is at least ``MIN_SCALE``.

    A constant tensor ``c`` yields ``[min(c, 0), max(c, 0)]`` through the quantizer, which has a
    positive scale unless ``c == 0``; an all-zero tensor (or any range narrower than
    ``MIN_SCALE`` levels) is widened upwards (both ways when symmetric) to exactly
    ``MIN_SCALE * (qmax - qmin)``. Float precisions are returned unchanged.
    """
    lo, hi = float(lo), float(hi)
    if not is_integer(precision):
        return lo, hi
    qmin, qmax = qrange(precision)
    span = max(hi, 0.0) - min(lo, 0.0)
    need = float(MIN_SCALE) * (qmax - qmin) * 1.0001
    if span >= need:
        return lo, hi
    if symmetric:
        half = need / 2.0
        return min(lo, -half), max(hi, half)
    return min(lo, 0.0), min(lo, 0.0) + need
