"""Rank statistics shared by the sensitivity check and the report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["spearman"]


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation, or None when it is undefined (fewer than 3 points, a constant side)."""
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    # scipy.stats costs most of a second to import; only the commands that rank pay for it
    from scipy.stats import spearmanr

    value = float(spearmanr(xs, ys).statistic)
    return value if np.isfinite(value) else None
