"""Sensitivity analysis: how much each layer × candidate precision (and each dependent pair of
layers) increases a label-free loss against the fp32 model.

Public API::

    from onnxq.sensitivity import analyze, predicted_loss

``analyze`` returns the DESIGN.md ``onnxq-sensitivity/1`` JSON dict; ``predicted_loss`` sums a
plan's deltas and the cross terms of its matching pairs. See :mod:`onnxq.sensitivity.analyze`
for the conventions.
"""

from __future__ import annotations

from onnxq.sensitivity.analyze import METHODS, SENSITIVITY_FORMAT, analyze, predicted_loss

__all__ = ["METHODS", "SENSITIVITY_FORMAT", "analyze", "predicted_loss"]
