"""Measure the quantized model against fp32 on held-back feeds, and its size."""

from __future__ import annotations

import logging

from onnxq.metrics import fidelity, resolve_metric
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.runtime import make_session, run_all

__all__ = ["MeasurePass", "model_bytes"]

logger = logging.getLogger(__name__)


def model_bytes(model) -> int:  # type: ignore[no-untyped-def]
    return int(model.ByteSize())


class MeasurePass(Pass):
    name = "measure"
    requires = ("feeds", "fp32_model")
    produces = ("measurement",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        feeds = list(ctx.artifacts["feeds"].held_back)
        reference = ctx.artifacts.get("fp32_outputs")
        if reference is None:
            reference = run_all(make_session(ctx.artifacts["fp32_model"]), feeds)
            ctx.artifacts["fp32_outputs"] = reference
        session = ctx.artifacts.get("session") or make_session(ctx.model)  # noqa
        outputs = run_all(session, feeds)
        metric = resolve_metric(ctx.options.metric, reference)
        value = fidelity(metric, reference, outputs)
        ctx.artifacts["measurement"] = {
            "name": metric.value,
            "fp32": 1.0,
            "quantized": value,
            "drop": 1.0 - value,
            "max_drop": ctx.options.max_drop,
            "feeds": len(feeds),
            "size_fp32": model_bytes(ctx.artifacts["fp32_model"]),
            "size_quantized": model_bytes(ctx.model),
        }
        return False
