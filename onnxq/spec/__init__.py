"""Hardware specs: what a target runs, in which formats, and at what cost.

Load one with :func:`load_spec` (a built-in name such as ``ort-cpu-x86`` or a JSON file);
:func:`check_spec_file` lists every problem of a spec file at once.
"""

from __future__ import annotations

from onnxq.spec.loader import (
    SpecProblem,
    builtin_specs,
    check_spec_file,
    load_spec,
    spec_schema,
)
from onnxq.spec.model import (
    DEFAULT_BIAS_INPUTS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LAYOUT_OPS,
    DEFAULT_MIN_OPSET,
    DEFAULT_WEIGHT_INPUTS,
    CostParams,
    Granularity,
    HardwareSpec,
    OpRule,
    QuantizerRule,
)

__all__ = [
    "DEFAULT_BIAS_INPUTS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_LAYOUT_OPS",
    "DEFAULT_MIN_OPSET",
    "DEFAULT_WEIGHT_INPUTS",
    "CostParams",
    "Granularity",
    "HardwareSpec",
    "OpRule",
    "QuantizerRule",
    "SpecProblem",
    "builtin_specs",
    "check_spec_file",
    "load_spec",
    "spec_schema",
]
