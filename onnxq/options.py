"""Options of one ``quantize`` run, shared by the CLI and the Python API."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["QuantizeOptions", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$ONNXQ_CACHE_DIR`` or ``~/.cache/onnxq``."""
    env = os.environ.get("ONNXQ_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxq"


@dataclass(frozen=True)
class QuantizeOptions:
    """What the user asked for (see ``onnxq quantize --help``)."""

    precision: str | None = None
    plan_path: str | None = None
    max_drop: float = 0.01
    target_size_mb: float | None = None
    target_latency_ratio: float | None = None
    target_bits: float | None = None
    metric: str = "auto"
    evaluator: str | None = None
    calibration: str = "minmax"
    seed: int = 0
    workers: int = 0
    executor: str = "local"
    progress: bool = field(default_factory=lambda: sys.stderr.isatty())
    cache_dir: str | None = None
    batch_size: int = 16
    #: bound (MB) on the activations the sensitivity analysis caches; ``None``: a quarter of the
    #: available memory
    memory_budget_mb: float | None = None

    @property
    def mode(self) -> str:
        if self.precision is not None:
            return "uniform"
        if self.plan_path is not None:
            return "plan"
        if self.target_size_mb is not None or self.target_latency_ratio is not None or self.target_bits is not None:
            return "budget"
        return "max-drop"

    def cache_path(self) -> Path | None:
        if self.cache_dir == "":
            return None
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()
