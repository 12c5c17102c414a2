"""Pass infrastructure: passes with declared requirements, cached analyses, timing.

A pass declares the artifacts it ``requires`` (e.g. ``plan``, ``ranges``) and the analyses it
``preserves``; the pipeline checks requirements before running it, times it, and drops every
cached analysis the pass did not preserve when it changed the model (as in MLIR's pass
manager). A failing pass raises an error naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx

from onnxq.errors import OnnxqError, PassError

__all__ = ["PassContext", "Pass", "Pipeline", "AnalysisCache", "ALL"]

logger = logging.getLogger(__name__)

#: ``preserves = ALL`` marks a pass that does not change the model.
ALL: frozenset[str] = frozenset({"*"})


class AnalysisCache:
    """Lazily computed analyses of the current model, keyed by name."""

    def __init__(self) -> None:
        self._builders: dict[str, Callable[[PassContext], Any]] = {}
        self._values: dict[str, Any] = {}

    def register(self, name: str, builder: Callable[[PassContext], Any]) -> None:
        self._builders[name] = builder

    def get(self, name: str, ctx: PassContext) -> Any:
        if name not in self._values:
            if name not in self._builders:
                raise PassError(f"no analysis named {name!r} is registered")
            started = time.perf_counter()
            self._values[name] = self._builders[name](ctx)
            ctx.add_time(f"analysis:{name}", time.perf_counter() - started)
        return self._values[name]

    def fresh(self) -> AnalysisCache:
        """The same registered analyses, none computed (for a pipeline on another model)."""
        other = AnalysisCache()
        other._builders = dict(self._builders)
        return other

    def cached(self) -> set[str]:
        return set(self._values)

    def invalidate(self, preserved: Iterable[str]) -> list[str]:
        keep = set(preserved)
        if "*" in keep:
            return []
        dropped = sorted(name for name in self._values if name not in keep)
        for name in dropped:
            del self._values[name]
        return dropped


@dataclass
class PassContext:
    """Everything passes share: the model being compiled, options, artifacts, analyses, timing."""

    model: onnx.ModelProto
    options: Any
    artifacts: dict[str, Any] = field(default_factory=dict)
    analyses: AnalysisCache = field(default_factory=AnalysisCache)
    timings: dict[str, float] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    def analysis(self, name: str) -> Any:
        return self.analyses.get(name, self)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class Pass(ABC):
    """One compiler pass.

    Class attributes:
        name: short name used in pipelines, timings and error messages.
        requires: artifacts that must exist in the context before the pass runs.
        produces: artifacts the pass adds.
        preserves: analyses still valid after the pass changed the model (``ALL`` if it does
            not change the model).
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[frozenset[str]] = ALL

    @abstractmethod
    def run(self, ctx: PassContext) -> bool:
        """Run the pass; return True when it changed ``ctx.model``."""

    def __repr__(self) -> str:
        return self.name


class Pipeline:
    """An ordered list of passes, run the same way by the CLI and the Python API."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __str__(self) -> str:
        return ",".join(p.name for p in self.passes)

    def run(self, ctx: PassContext) -> PassContext:
        for current in self.passes:
            missing = [a for a in current.requires if a not in ctx.artifacts]
            if missing:
                raise PassError(
                    f"pass {current.name!r} needs {', '.join(missing)}, which no earlier pass produced "
                    f"(pipeline so far: {', '.join(ctx.history) or 'empty'})")
            started = time.perf_counter()
            logger.debug("running pass %s", current.name)
            try:
                modified = current.run(ctx)
            except OnnxqError:
                raise
            except Exception as error:  # an internal failure: name the pass and its history
                raise PassError(
                    f"pass {current.name!r} failed after {', '.join(ctx.history) or 'no passes'}: {type(error).__name__}: {error}",
                    "rerun with --debug for the traceback and report it") from error
            finally:
                ctx.add_time(current.name, time.perf_counter() - started)
            missing_out = [a for a in current.produces if a not in ctx.artifacts]
            if missing_out:
                raise PassError(f"pass {current.name!r} did not produce {', '.join(missing_out)}")
            if modified:
                dropped = ctx.analyses.invalidate(current.preserves)
                if dropped:
                    logger.debug("pass %s invalidated analyses %s", current.name, dropped)
            ctx.history.append(current.name)
        return ctx
