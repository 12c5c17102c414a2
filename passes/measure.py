"""Measure the quantized model against fp32 on held-back feeds: fidelity, size, latency."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from onnxq.metrics import fidelity, resolve_metric
from onnxq.model import byte_size
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.runtime import make_session, run_all

__all__ = ["MeasurePass", "measure_latency"]

logger = logging.getLogger(__name__)


def measure_latency(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], budget_seconds: float = 1.0,
                    max_runs: int = 50) -> float:
    """Median latency in seconds of ``session`` on ``feed`` (warm-up first, bounded by a time budget)."""
    session.run(None, dict(feed))
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < 5 or time.perf_counter() - started < budget_seconds):
        tick = time.perf_counter()
        session.run(None, dict(feed))
        times.append(time.perf_counter() - tick)
    return float(np.median(times))


def _first_sample(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Batch-1 slice of a feed when the inputs are batched along axis 0."""
    sliced = {}
    for name, array in feed.items():
        sliced[name] = array[:1] if array.ndim >= 1 and array.shape[0] > 1 else array
    return sliced


class MeasurePass(Pass):
    """Fidelity to fp32 on held-back feeds, sizes, and onnxruntime latency at batch 1 (median)."""

    name = "measure"
    requires = ("feeds", "fp32_model")
    produces = ("measurement",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        feeds = list(ctx.artifacts["feeds"].held_back)
        fp32_model = ctx.artifacts["fp32_model"]
        reference = ctx.artifacts.get("fp32_outputs")
        fp32_session = make_session(fp32_model)
        if reference is None:
            reference = run_all(fp32_session, feeds)
            ctx.artifacts["fp32_outputs"] = reference
        session = ctx.artifacts.get("session") or make_session(ctx.model)
        outputs = run_all(session, feeds)
        metric = resolve_metric(ctx.options.metric, reference)
        value = fidelity(metric, reference, outputs)
        measurement = {
            "name": metric.value,
            "fp32": 1.0,
            "quantized": value,
            "drop": 1.0 - value,
            "max_drop": ctx.options.max_drop,
            "feeds": len(feeds),
            "size_fp32": byte_size(fp32_model),
            "size_quantized": byte_size(ctx.model),
        }
        if feeds:
            try:
                sample = _first_sample(feeds[0])
                fp32_latency = measure_latency(fp32_session, sample)
                quantized_latency = measure_latency(session, sample)
                measurement["latency"] = {
                    "batch": 1,
                    "fp32_ms": round(fp32_latency * 1e3, 4),
                    "quantized_ms": round(quantized_latency * 1e3, 4),
                    "ratio": round(quantized_latency / fp32_latency, 3) if fp32_latency > 0 else None,
                    "note": "median onnxruntime CPU latency on this machine, default session options",
                }
            except Exception as error:  # latency is informative; a model that ran above must not fail here
                logger.warning("latency measurement skipped: %s", error)
        ctx.artifacts["measurement"] = measurement
        return False
