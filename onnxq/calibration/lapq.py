"""Loss-aware post-training quantization ranges (LAPQ, Nahshan et al. 2019).

1. Start from the per-tensor ``Lp``-optimal ranges (``p`` in :data:`P_VALUES`, computed on the
   sweep histograms), keeping the ``p`` whose fake-quantized model is closest to fp32.
2. Refine all clipping ranges jointly: a factor ``α_k`` per tensor in :data:`BOUNDS` scales
   tensor ``k``'s initial range, and Powell's method (bounded, at most ``maxfev`` loss
   evaluations) minimises a label-free loss between the fake-quantized and the fp32 outputs
   on (a deterministic subset of) the calibration feeds.

The loss runs in one :class:`~onnxq.simulate.FakeQuantModel` session, so every evaluation is a
plain inference; the chosen ranges depend on each tensor's target bit width.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxq.calibration import thresholds as _th
from onnxq.calibration.histogram import TensorStats
from onnxq.calibration.types import TensorRange
from onnxq.errors import UsageError
from onnxq.numerics import QParams, qparams_from_range
from onnxq.precision import Precision, is_integer
from onnxq.progress import Progress
from onnxq.simulate import FakeQuantModel

__all__ = ["BOUNDS", "MAXFEV_CAP", "MAXFEV_PER_TENSOR", "P_VALUES", "lapq_ranges", "output_loss"]

logger = logging.getLogger(__name__)

#: Exponents tried for the initial ``Lp``-optimal ranges.
P_VALUES = (2.0, 2.5, 3.0, 4.0)

#: Bounds of the per-tensor factor on the initial range.
BOUNDS = (0.3, 1.2)

#: Default Powell budget: this many loss evaluations per tensor ...
MAXFEV_PER_TENSOR = 50

#: ... capped at this many in total.
MAXFEV_CAP = 500


def output_loss(
    outputs: Sequence[Sequence[np.ndarray]],
    reference: Sequence[Sequence[np.ndarray]],
    kind: str = "mse",
) -> float:
    """Label-free distance between quantized and fp32 outputs, averaged over feeds and outputs.

    ``"mse"``: squared error normalised by the reference's mean square (scale-free);
    ``"kl"``: KL divergence of the softmax over the last axis (classification logits).
    """
    total = 0.0
    count = 0
    for outs, refs in zip(outputs, reference, strict=True):
        for out, ref in zip(outs, refs, strict=True):
            out = np.asarray(out, dtype=np.float64)
            ref = np.asarray(ref, dtype=np.float64)
            if kind == "kl":
                lp = ref - ref.max(axis=-1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(axis=-1, keepdims=True))
                lq = out - out.max(axis=-1, keepdims=True)
                lq -= np.log(np.exp(lq).sum(axis=-1, keepdims=True))
                total += float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
            else:
                total += float(((out - ref) ** 2).mean() / max((ref**2).mean(), 1e-30))
            count += 1
    return total / max(count, 1)


def lapq_ranges(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    stats: Mapping[str, TensorStats],
    precisions: Mapping[str, Precision],
    symmetric: Mapping[str, bool],
    seed: int = 0,
    maxfev: int | None = None,
    max_feeds: int = 4,
    loss: str = "mse",
    weights: Mapping[str, np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, TensorRange]:
    """LAPQ ranges of the tensors in ``stats`` (which must carry histograms).

    Args:
        model: the fp32 model.
        feeds: the calibration feeds (validated already).
        stats: sweep statistics per tensor.
        precisions, symmetric: each tensor's quantizer.
        seed: picks the feed subset when there are more than ``max_feeds`` feeds.
        maxfev: loss evaluations allowed to Powell (default
            ``min(MAXFEV_PER_TENSOR * tensors, MAXFEV_CAP)``).
        max_feeds: feeds used by the loss.
        loss: ``"mse"`` or ``"kl"`` (see :func:`output_loss`).
        weights: quantized weight values fed in place of the fp32 ones during the search (the
            reference outputs stay fp32).
        progress: show the loss evaluations done and the time left (a bar on a terminal, a log
            line off one).
    """
    if loss not in ("mse", "kl"):
        raise UsageError(f"unknown LAPQ loss {loss!r}", "use 'mse' or 'kl'")
    names = [t for t, st in stats.items() if is_integer(precisions[t]) and st.count > 0]
    fallback = {
        t: _range(st, *_th.safe_range(*_th.minmax_range(st), precisions[t], symmetric[t]))
        if st.count
        else _range(st, *_th.safe_range(0.0, 0.0, precisions[t], symmetric[t]))
        for t, st in stats.items()
    }
    if not names:
        return fallback
    rng = np.random.default_rng(seed)
    if len(feeds) > max_feeds:
        subset = [feeds[i] for i in sorted(rng.choice(len(feeds), max_feeds, replace=False))]
    else:
        subset = list(feeds)
    weights = dict(weights or {})
    sim = FakeQuantModel(model, names, weight_tensors=sorted(weights))
    reference = [sim.run(f) for f in subset]

    def evaluate(lo: np.ndarray, hi: np.ndarray) -> float:
        params: dict[str, QParams | None] = {
            t: qparams_from_range(lo[k], hi[k], precisions[t], symmetric[t])
            for k, t in enumerate(names)
        }
        return output_loss([sim.run(f, params, weights or None) for f in subset], reference, loss)

    best_p, best_loss, lo0, hi0 = None, np.inf, None, None
    for p in P_VALUES:
        bounds = [
            _th.safe_range(*_th.lp_range(stats[t], precisions[t], symmetric[t], p),
                           precisions[t], symmetric[t])
            for t in names
        ]
        lo = np.array([b[0] for b in bounds])
        hi = np.array([b[1] for b in bounds])
        value = evaluate(lo, hi)
        logger.debug("LAPQ init p=%.1f: loss %.6g", p, value)
        if value < best_loss:
            best_p, best_loss, lo0, hi0 = p, value, lo, hi
    if lo0 is None or hi0 is None:  # every initial loss was NaN: keep the min/max ranges
        return fallback

    cache: dict[bytes, float] = {}
    n = len(names)
    budget = int(maxfev) if maxfev is not None else min(MAXFEV_PER_TENSOR * n, MAXFEV_CAP)
    # Powell stops at its tolerances or a little past the budget: the bar's total is the budget
    bar = Progress(budget, f"LAPQ ranges ({n} tensors)", "evaluation", progress)

    def objective(alpha: np.ndarray) -> float:
        alpha = np.clip(np.asarray(alpha, dtype=np.float64), *BOUNDS)
        key = np.round(alpha, 6).tobytes()
        if key not in cache:
            cache[key] = evaluate(alpha * lo0, alpha * hi0)
            if bar.done < bar.total:
                bar.update(1)
        return cache[key]

    x0 = np.ones(n)
    from scipy import optimize  # a second of import time that only LAPQ runs need

    with bar:
        result = optimize.minimize(
            objective,
            x0,
            method="Powell",
            bounds=[BOUNDS] * n,
            options={"maxfev": budget, "xtol": 1e-2, "ftol": 1e-3},
        )
    alpha = np.clip(np.asarray(result.x, dtype=np.float64), *BOUNDS)
    final = objective(alpha)
    if final > best_loss:
        alpha, final = x0, best_loss
    logger.info(
        "LAPQ over %d tensors: p=%.1f, loss %.6g -> %.6g in %d evaluations",
        n, best_p, best_loss, final, len(cache),
    )
    out = dict(fallback)
    for k, t in enumerate(names):
        lo, hi = _th.safe_range(alpha[k] * lo0[k], alpha[k] * hi0[k], precisions[t], symmetric[t])
        out[t] = _range(stats[t], lo, hi)
    return {t: out[t] for t in stats}


def _range(stats: TensorStats, lo: float, hi: float) -> TensorRange:
    return TensorRange(min=float(lo), max=float(hi), absmax_seen=float(stats.absmax), non_finite=stats.non_finite > 0)
