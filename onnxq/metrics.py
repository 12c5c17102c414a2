"""Label-free fidelity of a quantized model to its fp32 original.

Every metric is a fidelity in [0, 1]: 1 means identical to fp32, 0 means total disagreement.
A quantized output that is NaN or ±Inf where the fp32 output is finite is total disagreement
for every metric (a top-1 miss, cosine 0, no signal left over the noise): a model that outputs
NaN must never look faithful. Positions where the fp32 output itself is non-finite (a
``-inf`` attention-mask logit kept on purpose) carry no comparison and are left out.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["Metric", "resolve_metric", "fidelity", "looks_like_logits", "nonfinite_feeds"]

logger = logging.getLogger(__name__)


class Metric(enum.StrEnum):
    AUTO = "auto"
    AGREEMENT = "agreement"  # top-1 agreement of classification outputs
    COSINE = "cosine"  # mean cosine similarity of outputs, per sample (negative counts as 0)
    SQNR = "sqnr"  # signal-to-quantization-noise ratio in dB, mapped to [0, 1] as 1 - 10^(-sqnr/10)


def looks_like_logits(outputs: Sequence[np.ndarray]) -> bool:
    first = outputs[0]
    return first.dtype.kind == "f" and first.ndim == 2 and first.shape[-1] >= 2


def resolve_metric(metric: Metric | str, reference: Sequence[Sequence[np.ndarray]]) -> Metric:
    metric = Metric(metric)
    if metric is not Metric.AUTO:
        return metric
    return Metric.AGREEMENT if reference and looks_like_logits(reference[0]) else Metric.COSINE


def _rows(array: np.ndarray) -> np.ndarray:
    """The output as float64 rows, one per sample along axis 0 (a scalar or vector is one row)."""
    values = np.asarray(array)
    return values.reshape(values.shape[0], -1).astype(np.float64) if values.ndim > 1 else values.reshape(1, -1).astype(np.float64)


def _broken(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per element: the candidate is non-finite where the reference is finite."""
    return ~np.isfinite(candidate) & np.isfinite(reference)


def nonfinite_feeds(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> int:
    """How many feeds have an output that is NaN/Inf in ``candidate`` where ``reference`` is finite."""
    count = 0
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c in zip(ref, cand, strict=True):
            r2 = _rows(r)
            if np.any(_broken(r2, _rows(c).reshape(r2.shape))):
                count += 1
                break
    return count


def _agreement(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    agree = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        r = np.asarray(ref[0], dtype=np.float64)
        c = np.asarray(cand[0], dtype=np.float64).reshape(r.shape)
        same = np.argmax(np.nan_to_num(r, nan=-np.inf), axis=-1) == np.argmax(np.nan_to_num(c, nan=-np.inf), axis=-1)
        broken = np.any(_broken(r, c), axis=-1) if r.ndim else _broken(r, c)
        agree += int(np.sum(same & ~broken))
        total += int(np.size(same))
    return agree / max(total, 1)


def _cosine(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    sims: list[float] = []
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c in zip(ref, cand, strict=True):
            r2 = _rows(r)
            c2 = _rows(c).reshape(r2.shape)
            broken = np.any(_broken(r2, c2), axis=1)
            compared = np.isfinite(r2) & np.isfinite(c2)
            r2, c2 = np.where(compared, r2, 0.0), np.where(compared, c2, 0.0)
            with np.errstate(over="ignore", invalid="ignore"):
                num = np.sum(r2 * c2, axis=1)
                den = np.linalg.norm(r2, axis=1) * np.linalg.norm(c2, axis=1)
                row = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
            row = np.where(np.isfinite(row), np.clip(row, 0.0, 1.0), 0.0)
            sims.extend(np.where(broken, 0.0, row).tolist())
    return float(np.mean(sims)) if sims else 1.0


def _sqnr(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    signal = noise = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c in zip(ref, cand, strict=True):
            r2 = _rows(r)
            c2 = _rows(c).reshape(r2.shape)
            if np.any(_broken(r2, c2)):
                return 0.0  # infinite noise energy
            finite = np.isfinite(r2)
            with np.errstate(over="ignore", invalid="ignore"):
                signal += float(np.sum(np.square(r2[finite])))
                noise += float(np.sum(np.square(r2[finite] - c2[finite])))
    if noise == 0:
        return 1.0
    if not np.isfinite(noise):
        return 0.0
    return float(max(0.0, 1.0 - noise / max(signal, 1e-30)))


def fidelity(metric: Metric, reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    """Fidelity in [0, 1] (1 = identical to fp32, 0 = total disagreement) over batches of model outputs."""
    if metric is Metric.AGREEMENT:
        return _agreement(reference, candidate)
    if metric is Metric.COSINE:
        return _cosine(reference, candidate)
    return _sqnr(reference, candidate)
