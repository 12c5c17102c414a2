"""Calibration: activation ranges from one onnxruntime sweep, and weight ranges.

Public API::

    from onnxq.calibration import collect_ranges, weight_ranges, TensorRange, CalibrationMethod
"""

from __future__ import annotations

from onnxq.calibration.collect import collect_range_variants, collect_ranges
from onnxq.calibration.types import CalibrationMethod, TensorRange
from onnxq.calibration.weights import weight_ranges

__all__ = ["CalibrationMethod", "TensorRange", "collect_range_variants", "collect_ranges", "weight_ranges"]
