"""Calibrate the activation ranges the layouts need, in one onnxruntime sweep (cached).

Tensors inside control-flow subgraphs are threaded out to main-graph outputs first
(:func:`onnxq.subgraphs.expose`), so the same single sweep covers them.
"""

from __future__ import annotations

import logging

from onnxq.calibration import collect_ranges
from onnxq.layout import Layout
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import Precision, bits
from onnxq.subgraphs import expose

__all__ = ["CalibratePass"]

logger = logging.getLogger(__name__)


def _targets(layouts: list[Layout]) -> tuple[dict[str, Precision], dict[str, bool]]:
    targets: dict[str, Precision] = {}
    symmetric: dict[str, bool] = {}
    for layout in layouts:
        for tensor, precision in layout.calibration_targets().items():
            if tensor not in targets or bits(precision) < bits(targets[tensor]):
                targets[tensor] = precision
        for quant in layout.tensors.values():
            symmetric[quant.range_of] = symmetric.get(quant.range_of, False) or quant.symmetric
    return targets, symmetric


class CalibratePass(Pass):
    name = "calibrate"
    requires = ("layout", "feeds")
    produces = ("ranges",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        scoped = [layout for _, layout in ctx.artifacts.get("scope_layouts", [])]
        targets, symmetric = _targets([ctx.artifacts["layout"], *scoped])
        options = ctx.options
        if not targets:
            ctx.artifacts["ranges"] = {}
            return False
        model = ctx.model
        mapping = {t: t for t in targets}
        if scoped:
            model, mapping = expose(ctx.model, sorted(targets))
        ranges = collect_ranges(
            model,
            list(ctx.artifacts["feeds"].calibration),
            sorted(mapping[t] for t in targets),
            method=options.calibration,
            precision_for={mapping[t]: p for t, p in targets.items()},
            symmetric_for={mapping[t]: s for t, s in symmetric.items() if t in mapping},
            cache_dir=options.cache_path(),
            progress=options.progress,
            seed=options.seed,
        )
        inverse = {exposed: original for original, exposed in mapping.items()}
        ctx.artifacts["ranges"] = {inverse.get(name, name): value for name, value in ranges.items()}
        logger.info("calibrated %d tensors (%s)", len(targets), options.calibration)
        return False
