"""Label-free fidelity of a quantized model to its fp32 original, and model sizes."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["Metric", "resolve_metric", "fidelity", "looks_like_logits"]

logger = logging.getLogger(__name__)


class Metric(enum.StrEnum):
    AUTO = "auto"
    AGREEMENT = "agreement"  # top-1 agreement of classification outputs
    COSINE = "cosine"  # mean cosine similarity of outputs, per sample
    SQNR = "sqnr"  # signal-to-quantization-noise ratio in dB, mapped to [0, 1] as 1 - 10^(-sqnr/10)


def looks_like_logits(outputs: Sequence[np.ndarray]) -> bool:
    first = outputs[0]
    return first.dtype.kind == "f" and first.ndim == 2 and first.shape[-1] >= 2


def resolve_metric(metric: Metric | str, reference: Sequence[Sequence[np.ndarray]]) -> Metric:
    metric = Metric(metric)
    if metric is not Metric.AUTO:
        return metric
    return Metric.AGREEMENT if reference and looks_like_logits(reference[0]) else Metric.COSINE


def fidelity(metric: Metric, reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    """Fidelity in [0, 1] (1 = identical to fp32) over batches of model outputs."""
    if metric is Metric.AGREEMENT:
        agree = total = 0
        for ref, cand in zip(reference, candidate, strict=True):
            a, b = np.argmax(ref[0], axis=-1), np.argmax(cand[0], axis=-1)
            agree += int(np.sum(a == b))
            total += a.size
        return agree / max(total, 1)
    if metric is Metric.COSINE:
        sims = []
        for ref, cand in zip(reference, candidate, strict=True):
            for r, c in zip(ref, cand, strict=True):
                r2 = r.reshape(r.shape[0], -1).astype(np.float64) if r.ndim > 1 else r.reshape(1, -1).astype(np.float64)
                c2 = c.reshape(r2.shape).astype(np.float64)
                num = np.sum(r2 * c2, axis=1)
                den = np.linalg.norm(r2, axis=1) * np.linalg.norm(c2, axis=1)
                sims.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).tolist())
        return float(np.mean(sims)) if sims else 1.0
    signal = noise = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c in zip(ref, cand, strict=True):
            signal += float(np.sum(np.square(r.astype(np.float64))))
            noise += float(np.sum(np.square(r.astype(np.float64) - c.astype(np.float64))))
    if noise == 0:
        return 1.0
    sqnr_db = 10 * np.log10(max(signal, 1e-30) / noise)
    return float(1 - 10 ** (-sqnr_db / 10))
