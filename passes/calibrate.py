"""Calibrate the activation ranges the layout needs, in one onnxruntime sweep (cached)."""

from __future__ import annotations

import logging

from onnxq.calibration import collect_ranges
from onnxq.layout import Layout
from onnxq.pipeline import ALL, Pass, PassContext

__all__ = ["CalibratePass"]

logger = logging.getLogger(__name__)


class CalibratePass(Pass):
    name = "calibrate"
    requires = ("layout", "feeds")
    produces = ("ranges",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        layout: Layout = ctx.artifacts["layout"]
        targets = layout.calibration_targets()
        symmetric = {}
        for quant in layout.tensors.values():
            symmetric[quant.range_of] = symmetric.get(quant.range_of, False) or quant.symmetric
        options = ctx.options
        if not targets:
            ctx.artifacts["ranges"] = {}
            return False
        cache = options.cache_path()
        ctx.artifacts["ranges"] = collect_ranges(
            ctx.model,
            list(ctx.artifacts["feeds"].calibration),
            sorted(targets),
            method=options.calibration,
            precision_for=targets,
            symmetric_for=symmetric,
            cache_dir=cache,
            progress=options.progress,
            seed=options.seed,
        )
        logger.info("calibrated %d tensors (%s)", len(targets), options.calibration)
        return False
