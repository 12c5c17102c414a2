"""``collect_ranges``: activation ranges for many tensors from one calibration sweep."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxq.calibration import cache as _cache
from onnxq.calibration import thresholds as _th
from onnxq.calibration.histogram import TensorStats
from onnxq.calibration.lapq import lapq_ranges
from onnxq.calibration.sweep import check_tensors, prepare_feeds, sweep
from onnxq.calibration.types import CalibrationMethod, TensorRange
from onnxq.errors import UsageError
from onnxq.precision import Precision, is_integer

__all__ = ["DEFAULT_PRECISION", "Variant", "collect_ranges", "collect_range_variants", "ranges_from_stats"]

logger = logging.getLogger(__name__)

#: Target precision of a tensor that ``precision_for`` does not name.
DEFAULT_PRECISION = Precision.UINT8

#: One quantizer a tensor's range is wanted for: its precision and whether it is symmetric.
Variant = tuple[Precision, bool]


def _method(method: CalibrationMethod | str) -> CalibrationMethod:
    try:
        return CalibrationMethod(str(method).lower())
    except ValueError:
        names = ", ".join(m.value for m in CalibrationMethod)
        raise UsageError(
            f"unknown calibration method {method!r}", f"choose one of: {names}"
        ) from None


def _check_options(percentile: float, num_bins: int) -> None:
    if not 50.0 < float(percentile) <= 100.0:
        raise UsageError(f"percentile {percentile} is not in (50, 100]", "e.g. 99.99")
    if int(num_bins) < 16 or int(num_bins) % 2:
        raise UsageError(f"num_bins {num_bins} must be an even number >= 16", "e.g. 2048")


def _precisions(
    tensors: Sequence[str], precision_for: Mapping[str, Precision | str] | None
) -> dict[str, Precision]:
    given = precision_for or {}
    out = {}
    for t in tensors:
        value = given.get(t, DEFAULT_PRECISION)
        try:
            out[t] = Precision(str(value).lower())
        except ValueError:
            raise UsageError(
                f"unknown precision {value!r} for tensor {t!r}",
                f"known precisions: {' '.join(p.value for p in Precision)}",
            ) from None
    return out


def _cache_options(m: CalibrationMethod, tensors: Sequence[str], precisions: Mapping[str, Precision],
                   symmetric: Mapping[str, bool], num_bins: int, percentile: float, seed: int,
                   weights: Mapping[str, np.ndarray] | None) -> dict[str, object]:
    """Everything a set of ranges depends on besides the model and the feeds (the cache key)."""
    return {
        "method": m.value,
        "tensors": list(tensors),
        "precision": {t: precisions[t].value for t in tensors},
        "symmetric": {t: bool(symmetric[t]) for t in tensors},
        "num_bins": int(num_bins) if m.needs_histogram else None,
        "percentile": float(percentile) if m is CalibrationMethod.PERCENTILE else None,
        "seed": int(seed) if m is CalibrationMethod.LAPQ else None,
        "weights": (
            {name: hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()[:16] for name, w in sorted(weights.items())}
            if weights and m is CalibrationMethod.LAPQ else None
        ),
    }


def ranges_from_stats(
    stats: Mapping[str, TensorStats],
    method: CalibrationMethod,
    precisions: Mapping[str, Precision],
    symmetric: Mapping[str, bool],
    percentile: float = 99.99,
) -> dict[str, TensorRange]:
    """Turn sweep statistics into ranges with one of the histogram-only methods.

    ``lapq`` starts from these (it is refined by :mod:`onnxq.calibration.lapq`); here it gives
    the ``mse`` ranges. Float target precisions and constant tensors always get the min/max
    range; :func:`~onnxq.calibration.thresholds.safe_range` then widens all-zero tensors.
    """
    out: dict[str, TensorRange] = {}
    for name, st in stats.items():
        prec, sym = precisions[name], symmetric[name]
        if st.count == 0:
            lo, hi = 0.0, 0.0
        elif method is CalibrationMethod.MINMAX or not is_integer(prec) or st.min == st.max:
            lo, hi = _th.minmax_range(st)
        elif method is CalibrationMethod.PERCENTILE:
            lo, hi = _th.percentile_range(st, sym, percentile)
        elif method is CalibrationMethod.ENTROPY:
            lo, hi = _th.entropy_range(st, prec, sym)
        else:
            lo, hi = _th.mse_range(st, prec, sym)
        lo, hi = _th.safe_range(lo, hi, prec, sym)
        out[name] = TensorRange(min=float(lo), max=float(hi), absmax_seen=float(st.absmax),
                                 non_finite=st.non_finite > 0)
    return out


def collect_ranges(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]] | Iterable[Mapping[str, np.ndarray]],
    tensors: Sequence[str],
    method: CalibrationMethod | str = "minmax",
    precision_for: Mapping[str, Precision] | None = None,
    symmetric_for: Mapping[str, bool] | None = None,
    percentile: float = 99.99,
    num_bins: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    seed: int = 0,
    weights: Mapping[str, np.ndarray] | None = None,
) -> dict[str, TensorRange]:
    """Activation ranges of ``tensors`` on the calibration ``feeds``.

    All tensors are measured in one onnxruntime sweep (one session, each feed run once); the
    histogram methods keep a fixed-size, self-re-binning histogram per tensor, so memory does
    not grow with the number of feeds.

    Args:
        model: the fp32 model (not modified).
        feeds: complete feed dicts, one per batch (an iterable or ``CalibrationDataReader`` is
            drained into a list first).
        tensors: float activations of the main graph (graph inputs or node outputs).
        method: ``minmax``, ``percentile`` (of ``|x|`` when symmetric, both tails otherwise),
            ``entropy`` (TensorRT KL threshold), ``mse`` (expected quantization MSE) or ``lapq``
            (loss-aware joint refinement, Nahshan et al. 2019).
        precision_for: target precision per tensor (default uint8); clipping methods depend on
            the bit width, float targets always get min/max.
        symmetric_for: whether each tensor's quantizer is symmetric (default False).
        percentile: the percentile for ``percentile``, in (50, 100].
        num_bins: histogram bins per sign (even).
        cache_dir: directory of the on-disk cache, ``None`` to disable it.
        progress: show a tqdm bar over the feeds.
        seed: seed of any randomised step (kept in the cache key; the methods are deterministic).
        weights: ``lapq`` only: the quantized (dequantized) values of the weights the model will
            carry, so the loss the clipping is tuned on includes the weight quantization noise
            (LAPQ tunes activation ranges for the quantized network, not the fp32 one).

    Returns:
        ``{tensor: TensorRange}`` in the order of ``tensors``. A constant tensor ``c`` gets
        ``[c, c]`` (the quantizer widens it to include 0); an all-zero one is widened so that its
        scale is ``MIN_SCALE`` rather than 0.

    Raises:
        CalibrationError: no feeds, a feed with NaN/Inf or missing inputs, or an unknown tensor.
            NaN/Inf values that the model itself computes are left out of the ranges (and
            flagged in ``TensorRange.non_finite``), never an error.
        UsageError: an unknown method or precision, or an invalid option.
    """
    m = _method(method)
    tensors = list(dict.fromkeys(tensors))
    _check_options(percentile, num_bins)
    feed_list = prepare_feeds(feeds)
    precisions = _precisions(tensors, precision_for)
    symmetric = {t: bool((symmetric_for or {}).get(t, False)) for t in tensors}
    if not tensors:
        return {}
    types = check_tensors(model, tensors)

    key = None
    options = _cache_options(m, tensors, precisions, symmetric, num_bins, percentile, seed, weights)
    if cache_dir is not None:
        key = _cache.cache_key(
            _cache.model_digest(model), _cache.feeds_digest(feed_list), options
        )
        hit = _cache.load(cache_dir, key, tensors)
        if hit is not None:
            return hit

    start = time.perf_counter()
    stats = sweep(
        model,
        feed_list,
        tensors,
        num_bins=int(num_bins) if m.needs_histogram else None,
        progress=progress,
        types=types,
    )
    ranges = ranges_from_stats(stats, m, precisions, symmetric, percentile)
    if m is CalibrationMethod.LAPQ:
        ranges = lapq_ranges(model, feed_list, stats, precisions, symmetric, seed=seed, weights=weights,
                             progress=progress)
    logger.info(
        "calibrated %d tensors with %s on %d feeds in %.2fs",
        len(tensors), m.value, len(feed_list), time.perf_counter() - start,
    )
    if key is not None and cache_dir is not None:
        _cache.store(cache_dir, key, ranges, options)
    return ranges


def collect_range_variants(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    variants: Mapping[str, Sequence[Variant]],
    method: CalibrationMethod | str = "minmax",
    percentile: float = 99.99,
    num_bins: int = 2048,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict[tuple[str, Precision, bool], TensorRange]:
    """Ranges of every tensor at each of its quantizer ``variants``, from one sweep.

    A search builds plans that quantize the same tensor at ``int8`` in one plan and ``uint8`` in
    another; the statistics of one sweep serve every variant (:func:`ranges_from_stats`), where
    :func:`collect_ranges`, one precision per tensor, would sweep the feeds again. The on-disk
    cache holds each round of variants (the k-th variant of every tensor) under the key
    :func:`collect_ranges` gives the same request. Not for ``lapq`` (its ranges are fitted
    jointly per plan).

    Returns:
        ``{(tensor, precision, symmetric): TensorRange}``.
    """
    m = _method(method)
    _check_options(percentile, num_bins)
    if m is CalibrationMethod.LAPQ:
        raise UsageError("lapq ranges are fitted per plan, not per tensor variant", "use collect_ranges")
    feed_list = prepare_feeds(feeds)
    depth = max((len(v) for v in variants.values()), default=0)
    rounds = [{t: tuple(v[k]) for t, v in variants.items() if k < len(v)} for k in range(depth)]
    digests = (_cache.model_digest(model), _cache.feeds_digest(feed_list)) if cache_dir is not None else None
    out: dict[tuple[str, Precision, bool], TensorRange] = {}
    todo: list[tuple[dict[str, Variant], dict[str, object], str | None]] = []
    for chosen in rounds:
        tensors = list(chosen)
        options = _cache_options(m, tensors, {t: chosen[t][0] for t in tensors}, {t: chosen[t][1] for t in tensors},
                                 num_bins, percentile, seed, None)
        key = _cache.cache_key(*digests, options) if digests is not None else None
        hit = _cache.load(cache_dir, key, tensors) if key is not None and cache_dir is not None else None
        if hit is None:
            todo.append((chosen, options, key))
        else:
            out.update({(t, *chosen[t]): r for t, r in hit.items()})
    if not todo:
        return out
    tensors = list(dict.fromkeys(t for chosen, _, _ in todo for t in chosen))
    stats = sweep(model, feed_list, tensors, num_bins=int(num_bins) if m.needs_histogram else None,
                  progress=progress, types=check_tensors(model, tensors))
    for chosen, options, key in todo:
        ranges = ranges_from_stats({t: stats[t] for t in chosen}, m, {t: v[0] for t, v in chosen.items()},
                                   {t: v[1] for t, v in chosen.items()}, percentile)
        if key is not None and cache_dir is not None:
            _cache.store(cache_dir, key, ranges, options)
        out.update({(t, *chosen[t]): r for t, r in ranges.items()})
    return out
