"""Real evaluations of a plan: build its quantized model with the pipeline's own passes, run it.

The search never trusts its predictions alone: :class:`PlanEvaluator` builds the model of a
plan exactly as the final pipeline will (prepare, layout, calibrate, rewrite) on a copy of the
fp32 model, runs it in onnxruntime on the held-back feeds, and measures the drop of the
fidelity to fp32 (:mod:`onnxq.metrics`), or of the user's ``--evaluator MODULE:FUNCTION``
(``f(onnx_path) -> float``, higher is better).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxq.passes.calibrate import CalibratePass
from onnxq.passes.layout import LayoutPass, plan_layouts
from onnxq.passes.prepare import PreparePass
from onnxq.passes.rewrite import RewritePass

from onnxq.errors import UsageError
from onnxq.layout import Layout
from onnxq.metrics import fidelity, resolve_metric
from onnxq.model import rewritable_copy
from onnxq.pipeline import PassContext, Pipeline
from onnxq.precision import Candidate
from onnxq.runtime import fidelity_session, make_session, run_all

__all__ = ["Evaluation", "PlanEvaluator", "load_evaluator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """One measured plan: the metric's value, the drop from fp32, the time it took."""

    value: float
    drop: float
    seconds: float


def load_evaluator(text: str) -> Callable[[str], float]:
    """Import ``MODULE:FUNCTION``."""
    module_name, _, function_name = text.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"--evaluator {text!r} is not MODULE:FUNCTION", "e.g. --evaluator mypkg.evals:accuracy")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"cannot import evaluator {text!r}: {error}", "check that the module is on PYTHONPATH") from error
    if not callable(function):
        raise UsageError(f"evaluator {text!r} is not callable", "point it at a function f(onnx_path) -> float")
    return function  # type: ignore[no-any-return]


class PlanEvaluator:
    """Builds and measures plans against the fp32 model of a pipeline context.

    Args:
        ctx: the pipeline context (its ``model`` is the fp32 working model before any rewrite;
            artifacts ``spec``, ``feeds``, ``fp32_model``).
    """

    def __init__(self, ctx: PassContext) -> None:
        #: the pipeline's model, never modified here (every build works on its own copy)
        self.base = ctx.model
        self.options = ctx.options
        self.artifacts = {key: ctx.artifacts[key] for key in ("spec", "feeds", "fp32_model", "fp32_path")
                          if key in ctx.artifacts}
        # ranges the plan builds share with each other and with the pipeline's final calibration
        self.artifacts["range_memo"] = ctx.artifacts.setdefault("range_memo", {})
        self.analyses = ctx.analyses  # the same analyses as the pipeline, recomputed per plan model
        self.feeds = list(ctx.artifacts["feeds"].held_back)
        self.evaluations = 0
        self._user = load_evaluator(self.options.evaluator) if getattr(self.options, "evaluator", None) else None
        self._reference: Any = None
        self._user_fp32: float | None = None
        self.metric_name = "user" if self._user else ""

    def build(self, plan: Mapping[str, Candidate]) -> onnx.ModelProto:
        """The quantized model of ``plan`` (prepare, layout, calibrate, rewrite).

        The passes work on the fp32 model's :func:`~onnxq.model.rewritable_copy` and read its
        weights from the fp32 model (artifact ``weight_source``); the rewrite copies in the fp32
        tensors the built model keeps (float layers). A copy of the whole model per build held
        the weights twice for every plan measured.
        """
        skeleton, weights = rewritable_copy(self.base)
        ctx = PassContext(model=skeleton, options=self.options, analyses=self.analyses.fresh())
        ctx.artifacts.update(self.artifacts)
        ctx.artifacts["plan"] = dict(plan)
        ctx.artifacts["weight_source"] = weights
        Pipeline([PreparePass(), LayoutPass(), CalibratePass(), RewritePass()]).run(ctx)
        return ctx.model

    def prime(self, plans: Sequence[Mapping[str, Candidate]]) -> None:
        """Calibrate once for all of ``plans`` (see :meth:`CalibratePass.prime`): their builds
        then find every activation range in the run's memo instead of sweeping the feeds again."""
        ctx = PassContext(model=self.base, options=self.options, analyses=self.analyses.fresh())
        ctx.artifacts.update(self.artifacts)
        layouts: list[Layout] = []
        scoped = False
        for plan in plans:
            ctx.artifacts["plan"] = dict(plan)
            main, scope_layouts = plan_layouts(ctx)
            layouts += [main, *(layout for _, layout in scope_layouts)]
            scoped = scoped or bool(scope_layouts)
        CalibratePass().prime(ctx, layouts, scoped)

    def _user_value(self, model: onnx.ModelProto) -> float:
        assert self._user is not None
        with tempfile.TemporaryDirectory(prefix="onnxq-eval-") as folder:
            path = Path(folder) / "model.onnx"
            onnx.save(model, str(path))
            return float(self._user(str(path)))

    def measure_model(self, model: onnx.ModelProto) -> Evaluation:
        """Measure an already built model."""
        started = time.perf_counter()
        self.evaluations += 1
        if self._user is not None:
            if self._user_fp32 is None:
                self._user_fp32 = self._user_value(self.artifacts["fp32_model"])
            value = self._user_value(model)
            return Evaluation(value, self._user_fp32 - value, time.perf_counter() - started)
        if self._reference is None:
            fp32 = make_session(self.artifacts["fp32_model"], path=self.artifacts.get("fp32_path"))
            self._reference = run_all(fp32, self.feeds)
            del fp32
        metric = resolve_metric(self.options.metric, self._reference)
        self.metric_name = metric.value
        session = fidelity_session(model, getattr(self.artifacts.get("spec"), "runtime", None))
        value = fidelity(metric, self._reference, run_all(session, self.feeds))
        return Evaluation(value, 1.0 - value, time.perf_counter() - started)

    def measure(self, plan: Mapping[str, Candidate]) -> Evaluation:
        """Build ``plan``'s model and measure its drop (one real evaluation)."""
        evaluation = self.measure_model(self.build(plan))
        logger.info("evaluated a plan with %d quantized layers: drop %.5f", sum(not c.is_float for c in plan.values()), evaluation.drop)
        return evaluation
