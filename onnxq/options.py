"""Options of one ``quantize`` run, shared by the CLI and the Python API."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from onnxq.errors import UsageError

__all__ = ["QuantizeOptions", "LayerPattern", "excluded_layers", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$ONNXQ_CACHE_DIR`` or ``~/.cache/onnxq``."""
    env = os.environ.get("ONNXQ_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxq"


@dataclass(frozen=True)
class LayerPattern:
    """One ``--exclude`` word: a layer name, ``re:PATTERN`` (the whole name must match), or ``op:TYPE``."""

    kind: str  # "name", "regex" or "op"
    value: str

    @classmethod
    def parse(cls, text: str) -> LayerPattern:
        if text.startswith("re:"):
            try:
                re.compile(text[3:])
            except re.error as error:
                raise UsageError(f"--exclude {text!r}: not a regular expression ({error})", "e.g. --exclude 're:.*attn.*'") from error
            return cls("regex", text[3:])
        if text.startswith("op:"):
            if not text[3:]:
                raise UsageError(f"--exclude {text!r} names no op type", "e.g. --exclude op:Conv")
            return cls("op", text[3:])
        if not text:
            raise UsageError("--exclude needs a layer name", "e.g. --exclude head/Gemm, --exclude 're:blk3/.*' or --exclude op:Conv")
        return cls("name", text)

    def matches(self, name: str, op_type: str) -> bool:
        if self.kind == "regex":
            return re.fullmatch(self.value, name) is not None
        if self.kind == "op":
            return op_type == self.value
        return name == self.value

    def __str__(self) -> str:
        return {"regex": "re:", "op": "op:", "name": ""}[self.kind] + self.value


def excluded_layers(patterns: Iterable[LayerPattern], layers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Names of the layers (``(name, op_type)`` pairs) any pattern matches; a pattern that matches
    no layer is an error (a typo must not silently quantize the layer it meant)."""
    layers = list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = {name for name, op_type in layers if pattern.matches(name, op_type)}
        if not matched:
            raise UsageError(f"--exclude {str(pattern)!r} matches no layer of the model",
                             "run `onnxq inspect MODEL` for the layer names and op types")
        chosen |= matched
    return frozenset(chosen)


#: Values of ``--objective`` (:class:`onnxq.search.objective.Objective`).
OBJECTIVES = ("latency", "size", "balanced")


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
    #: what the accuracy-range search optimises among plans inside the range (``--objective``)
    objective: str = "latency"
    #: batch size latency is measured at, as the user deploys (``--deploy-batch``)
    deploy_batch: int = 1
    #: layers kept float whatever the mode: names, ``re:PATTERN`` or ``op:TYPE`` (``--exclude``)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}",
                             "use latency (default), size or balanced")
        if self.deploy_batch < 1:
            raise UsageError(f"deploy batch {self.deploy_batch} is not a batch size", "give 1 or more")

    def exclusions(self) -> tuple[LayerPattern, ...]:
        return tuple(LayerPattern.parse(text) for text in self.exclude)

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
