"""Sensitivity analysis: how much each layer × candidate precision (and each dependent pair of
layers) increases a label-free loss against the fp32 model.

Public API::

    from onnxq.sensitivity import analyze, predicted_loss, bounded_cross

``analyze`` returns the DESIGN.md ``onnxq-sensitivity/1`` JSON dict; ``predicted_loss`` sums a
plan's deltas and the cross terms of its matching pairs. See :mod:`onnxq.sensitivity.analyze`
for the conventions.
"""

from __future__ import annotations

from onnxq.sensitivity.analyze import (
    ALGORITHM_VERSION,
    METHODS,
    SENSITIVITY_FORMAT,
    analyze,
    bounded_cross,
    predicted_loss,
    spec_digest,
)

__all__ = ["ALGORITHM_VERSION", "METHODS", "SENSITIVITY_FORMAT", "analyze", "bounded_cross", "predicted_loss",
           "spec_digest"]
