"""Label-free fidelity of a quantized model to its fp32 original.

Every metric is a fidelity in [0, 1]: 1 means identical to fp32, 0 means total disagreement.
A quantized output that is NaN or ±Inf where the fp32 output is finite is total disagreement
for every metric (a top-1 miss, cosine 0, no signal left over the noise): a model that outputs
NaN must never look faithful. Positions where the fp32 output itself is non-finite (a
``-inf`` attention-mask logit kept on purpose) carry no comparison and are left out.

``auto`` picks a *continuous* metric, so that a range decision is not flipped by one sample:
with 64 held-back samples, top-1 agreement moves in steps of 1.6 points, and a sample on the
fp32 model's own decision boundary flips on any noise. For classifier outputs it is the soft
agreement, 1 − total-variation distance between the fp32 and quantized class distributions
per sample: on the agreement scale (a confident flip costs about one sample, a flip between
two near-equal classes almost nothing, which is what it costs the task in expectation) and
continuous. Other outputs (embeddings, feature maps, regressions) use the cosine.
:func:`fidelity_interval` gives a bootstrap 95% interval over samples for the report.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["Metric", "resolve_metric", "fidelity", "fidelity_interval", "looks_like_logits", "nonfinite_feeds"]

logger = logging.getLogger(__name__)


class Metric(enum.StrEnum):
    AUTO = "auto"
    AGREEMENT = "agreement"  # top-1 agreement of classification outputs
    SOFT_AGREEMENT = "soft-agreement"  # 1 - total variation between class distributions, per sample
    COSINE = "cosine"  # mean cosine similarity of outputs, per sample (negative counts as 0)
    SQNR = "sqnr"  # signal-to-quantization-noise ratio in dB, mapped to [0, 1] as 1 - 10^(-sqnr/10)


#: More columns than this and a 2-D output reads as an embedding, not as class scores.
MAX_CLASSES = 1000


def looks_like_logits(outputs: Sequence[np.ndarray]) -> bool:
    """A 2-D float output with 2..MAX_CLASSES columns whose rows are not unit vectors
    (L2-normalised rows are embeddings, compared by cosine)."""
    first = np.asarray(outputs[0])
    if first.dtype.kind != "f" or first.ndim != 2 or not 2 <= first.shape[-1] <= MAX_CLASSES:
        return False
    norms = np.linalg.norm(np.nan_to_num(first.astype(np.float64), posinf=0.0, neginf=0.0), axis=-1)
    return not bool(np.allclose(norms, 1.0, atol=1e-3))


def resolve_metric(metric: Metric | str, reference: Sequence[Sequence[np.ndarray]]) -> Metric:
    metric = Metric(metric)
    if metric is not Metric.AUTO:
        return metric
    return Metric.SOFT_AGREEMENT if reference and looks_like_logits(reference[0]) else Metric.COSINE


def _are_distributions(rows: np.ndarray) -> bool:
    """Whether the fp32 rows already are class distributions (a Softmax output)."""
    return bool(np.all(np.isfinite(rows)) and np.all(rows >= 0) and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3))


def _distribution(rows: np.ndarray, probabilities: bool) -> np.ndarray:
    """Class distributions. ``probabilities`` (decided on the fp32 rows, so that both sides are
    read alike): the rows themselves, renormalised; a quantized Softmax output sums to 1 only
    within its grid's rounding (±2% at int8) and read as logits it would be softmaxed into a
    near-uniform distribution. Otherwise their softmax (non-finite logits count as impossible
    classes)."""
    finite = np.isfinite(rows)
    if probabilities:
        mass = np.where(finite, np.maximum(rows, 0.0), 0.0)
        total = mass.sum(axis=-1, keepdims=True)
        return np.where(total > 0, mass / np.maximum(total, 1e-300), 0.0)
    logits = np.where(finite, rows, -np.inf)
    top = np.max(np.where(finite, rows, -np.inf), axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        weights = np.exp(logits - top)
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.maximum(total, 1e-300), 0.0)


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


def _soft_agreement_scores(reference: Sequence[Sequence[np.ndarray]],
                           candidate: Sequence[Sequence[np.ndarray]]) -> list[float]:
    scores: list[float] = []
    for ref, cand in zip(reference, candidate, strict=True):
        r = _rows(ref[0])
        c = _rows(cand[0]).reshape(r.shape)
        broken = np.any(_broken(r, c), axis=-1)
        probabilities = _are_distributions(r)
        tv = 0.5 * np.sum(np.abs(_distribution(r, probabilities)
                                 - _distribution(np.where(broken[:, None], 0.0, c), probabilities)), axis=-1)
        scores.extend(np.where(broken | ~np.isfinite(tv), 0.0, np.clip(1.0 - tv, 0.0, 1.0)).tolist())
    return scores


def _agreement_scores(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> list[float]:
    scores: list[float] = []
    for ref, cand in zip(reference, candidate, strict=True):
        r = np.asarray(ref[0], dtype=np.float64)
        c = np.asarray(cand[0], dtype=np.float64).reshape(r.shape)
        same = np.argmax(np.nan_to_num(r, nan=-np.inf), axis=-1) == np.argmax(np.nan_to_num(c, nan=-np.inf), axis=-1)
        broken = np.any(_broken(r, c), axis=-1) if r.ndim else _broken(r, c)
        scores.extend(np.atleast_1d(same & ~broken).astype(float).tolist())
    return scores


def _agreement(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    scores = _agreement_scores(reference, candidate)
    return float(np.mean(scores)) if scores else 0.0


def _cosine(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    sims = _cosine_scores(reference, candidate)
    return float(np.mean(sims)) if sims else 1.0


def _cosine_scores(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> list[float]:
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
    return sims


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
    if metric is Metric.SOFT_AGREEMENT:
        scores = _soft_agreement_scores(reference, candidate)
        return float(np.mean(scores)) if scores else 1.0
    if metric is Metric.COSINE:
        return _cosine(reference, candidate)
    return _sqnr(reference, candidate)


def fidelity_interval(metric: Metric, reference: Sequence[Sequence[np.ndarray]],
                      candidate: Sequence[Sequence[np.ndarray]], resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap 95% interval of the fidelity over samples (None for SQNR, a pooled ratio, and
    for fewer than two samples)."""
    by_metric = {Metric.AGREEMENT: _agreement_scores, Metric.SOFT_AGREEMENT: _soft_agreement_scores,
                 Metric.COSINE: _cosine_scores}
    if metric not in by_metric:
        return None
    scores = np.asarray(by_metric[metric](reference, candidate), dtype=np.float64)
    if scores.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, scores.size, size=(resamples, scores.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
