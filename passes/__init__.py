"""The compiler passes of onnxq, one per module, run by :class:`onnxq.pipeline.Pipeline`."""

from __future__ import annotations

from onnxq.passes.calibrate import CalibratePass
from onnxq.passes.copy import CopyModelPass
from onnxq.passes.layout import LayoutPass
from onnxq.passes.measure import MeasurePass
from onnxq.passes.plan import ExplicitPlanPass, UniformPlanPass
from onnxq.passes.prepare import PreparePass
from onnxq.passes.rewrite import RewritePass
from onnxq.passes.validate import ValidatePass

__all__ = [
    "CalibratePass",
    "CopyModelPass",
    "ExplicitPlanPass",
    "LayoutPass",
    "MeasurePass",
    "PreparePass",
    "RewritePass",
    "UniformPlanPass",
    "ValidatePass",
]
