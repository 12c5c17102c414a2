"""Plain data of the calibration package: the range of one tensor and the method names."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CalibrationMethod", "TensorRange"]


@dataclass(frozen=True)
class TensorRange:
    """The range a quantizer of one activation tensor should cover.

    Attributes:
        min: lower end of the (possibly clipped) range.
        max: upper end of the (possibly clipped) range.
        absmax_seen: the largest finite ``|x|`` observed on the calibration data (for reports).
        non_finite: the tensor also took NaN or ±Inf values (left out of the range: an attention
            mask's ``-inf``, a ``Log(0)`` that a later ``Where`` discards); a quantizer would
            turn them into finite values, so such a tensor is best left in float.
    """

    min: float
    max: float
    absmax_seen: float
    non_finite: bool = False

    def to_json(self) -> list[float]:
        """``[min, max, absmax_seen, non_finite]``, the form the on-disk cache stores."""
        return [float(self.min), float(self.max), float(self.absmax_seen), float(self.non_finite)]

    @classmethod
    def from_json(cls, values: list[float]) -> TensorRange:
        """Inverse of :meth:`to_json`."""
        lo, hi, absmax, non_finite = (float(v) for v in values)
        return cls(min=lo, max=hi, absmax_seen=absmax, non_finite=bool(non_finite))


class CalibrationMethod(enum.StrEnum):
    """How an activation range is chosen from the calibration statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    LAPQ = "lapq"

    @property
    def needs_histogram(self) -> bool:
        """True for the methods that choose a clipping threshold from a histogram."""
        return self is not CalibrationMethod.MINMAX
