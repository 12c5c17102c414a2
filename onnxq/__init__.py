"""onnxq: mixed-precision post-training quantization compiler for ONNX."""

from __future__ import annotations

import os as _os

# Run from a source checkout (``python -m onnxq`` or ``python -m pytest`` in the repository root),
# this folder shadows the installed package, and ``onnxq.passes`` / ``onnxq.hardware_specs`` —
# which setup.cfg maps from the top-level ``passes/`` and ``hardware_specs/`` folders — must be
# found there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.cfg")) and _os.path.isfile(_os.path.join(_root, "passes", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

from onnxq.api import QuantizeResult, quantize  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402
from onnxq.version import __version__  # noqa: E402

__all__ = ["__version__", "quantize", "QuantizeResult", "OnnxqError"]
