"""Measure the written model against fp32 on held-back feeds, and judge it against the targets.

Fidelity, size and latency are measured on the model exactly as it will be written, and every
target that can be checked there is: the size budget against the serialized bytes, the latency
budget against the measured latency ratio, and, whatever the mode, finite outputs wherever the
fp32 model's are finite. A model that fails a check is still handed back (DESIGN.md exit code 1:
the best model found is written) but never as a success: ``target_met`` turns false and the
``shortfall`` says by how much.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxq.data import batch_axes, first_sample
from onnxq.latency import deploy_feeds, time_interleaved
from onnxq.metrics import fidelity, fidelity_interval, nonfinite_feeds, resolve_metric
from onnxq.model import byte_size
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.runtime import fidelity_session, make_session, run_all

#: Deploy-shape feeds timed by the final latency measurement (batch > 1).
LATENCY_FEEDS = 4

__all__ = ["MeasurePass", "written_model_shortfalls"]

logger = logging.getLogger(__name__)


def _deploy_feeds(feeds: list[Mapping[str, np.ndarray]], model: Any, batch: int) -> list[dict[str, np.ndarray]]:
    """Feeds at the deploy batch: one sample cut along each input's batch axis for batch 1,
    otherwise samples grouped (and ragged ones padded) by :func:`onnxq.latency.deploy_feeds`."""
    if batch == 1:
        return [first_sample(feeds[0], batch_axes(model))]
    return deploy_feeds(feeds, batch)[:LATENCY_FEEDS]


def written_model_shortfalls(options: Any, measurement: Mapping[str, Any]) -> list[str]:
    """The targets the measured, written model misses, one sentence each (empty: all met)."""
    problems = []
    broken = measurement.get("nonfinite_feeds", 0)
    if broken:
        problems.append(f"the quantized model outputs NaN or Inf on {broken} of {measurement['feeds']} held-back feed(s) "
                        "where the fp32 model's outputs are finite")
    if options.target_size_mb is not None and measurement["size_quantized"] > options.target_size_mb * 1e6:
        size = measurement["size_quantized"]
        problems.append(f"the written model is {size / 1e6:.4f} MB, {(size - options.target_size_mb * 1e6) / 1e6:.4f} MB "
                        f"over the --target-size of {options.target_size_mb:g} MB")
    ratio = measurement.get("latency", {}).get("ratio")
    if options.target_latency_ratio is not None and ratio is not None and ratio > options.target_latency_ratio:
        problems.append(f"the written model's measured latency is {ratio:.3f}× fp32, over the "
                        f"--target-latency-ratio of {options.target_latency_ratio:g}")
    return problems


class MeasurePass(Pass):
    """Fidelity to fp32 on held-back feeds, sizes, onnxruntime latency at batch 1 (median), and
    the verdict on the targets checkable on the written model."""

    name = "measure"
    requires = ("feeds", "fp32_model")
    produces = ("measurement",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        feeds = list(ctx.artifacts["feeds"].held_back)
        fp32_model = ctx.artifacts["fp32_model"]
        reference = ctx.artifacts.get("fp32_outputs")
        fp32_session = make_session(fp32_model, path=ctx.artifacts.get("fp32_path"))
        if reference is None:
            reference = run_all(fp32_session, feeds)
            ctx.artifacts["fp32_outputs"] = reference
        session = ctx.artifacts.get("session") or make_session(ctx.model)
        runtime = getattr(ctx.artifacts.get("spec"), "runtime", None)
        outputs = run_all(fidelity_session(ctx.model, runtime, default=session), feeds)
        metric = resolve_metric(ctx.options.metric, reference)
        value = fidelity(metric, reference, outputs)
        measurement: dict[str, Any] = {
            "name": metric.value,
            "fp32": 1.0,
            "quantized": value,
            "drop": 1.0 - value,
            "max_drop": ctx.options.max_drop,
            "interval95": fidelity_interval(metric, reference, outputs, seed=ctx.options.seed),
            "feeds": len(feeds),
            "nonfinite_feeds": nonfinite_feeds(reference, outputs),
            "size_fp32": byte_size(fp32_model),
            "size_quantized": byte_size(ctx.model),
        }
        if feeds:
            try:
                batch = ctx.options.deploy_batch
                timings = time_interleaved({"fp32": fp32_session, "quantized": session},
                                           _deploy_feeds(feeds, fp32_model, batch), "fp32")
                measurement["latency"] = {
                    "batch": batch,
                    "fp32_ms": round(timings["fp32"].median_ms, 4),
                    "quantized_ms": round(timings["quantized"].median_ms, 4),
                    "ratio": round(timings["quantized"].ratio, 3),
                    "ratio_quartiles": [round(timings["quantized"].ratio_low, 3), round(timings["quantized"].ratio_high, 3)],
                    "rounds": timings["quantized"].rounds,
                    "note": "onnxruntime CPU latency on this machine, default session options, interleaved with fp32: "
                            "median of the per-round ratios and their quartiles",
                }
            except Exception as error:  # latency is informative; a model that ran above must not fail here
                logger.warning("latency measurement skipped: %s", error)
        ctx.artifacts["measurement"] = measurement
        problems = written_model_shortfalls(ctx.options, measurement)
        if problems:
            ctx.artifacts["target_met"] = False
            ctx.artifacts["shortfalls"] = [*ctx.artifacts.get("shortfalls", []), *problems]
            for problem in problems:
                logger.warning("target not met: %s", problem)
        return False
