"""The Python API: ``onnxq.quantize(model, calibration, spec, ...)``.

The CLI calls the same function, so both run one pipeline.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx

from onnxq.data import load_feeds
from onnxq.errors import UsageError
from onnxq.graph import graph_view_for, layer_ops_for, scope_views_for
from onnxq.model import check_quantizable_dtypes, load_model
from onnxq.options import QuantizeOptions, excluded_layers
from onnxq.passes import (
    CalibratePass,
    CopyModelPass,
    ExplicitPlanPass,
    LayoutPass,
    MeasurePass,
    PreparePass,
    RewritePass,
    UniformPlanPass,
    ValidatePass,
)
from onnxq.passes.exclude import KeepFloatPass
from onnxq.passes.plan import plan_to_json, read_plan
from onnxq.passes.search import SearchPass
from onnxq.pipeline import Pass, PassContext, Pipeline
from onnxq.precision import Candidate
from onnxq.rewrite import plan_summary
from onnxq.spec import HardwareSpec, load_spec
from onnxq.subgraphs import ensure_unique_node_names
from onnxq.version import __version__

__all__ = ["QuantizeResult", "quantize", "build_pipeline", "layer_ops_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model and the report (DESIGN.md, "Report")."""

    model: onnx.ModelProto
    report: dict[str, Any]
    target_met: bool = True


def build_pipeline(options: QuantizeOptions, plan: Mapping[str, Candidate] | None = None) -> Pipeline:
    planner: Pass
    if options.mode == "uniform":
        planner = UniformPlanPass(Candidate.parse(options.precision or "int8/uint8"))
    elif options.mode == "plan":
        if plan is None:
            raise UsageError("--plan needs a plan", "pass --plan PLAN.json")
        planner = ExplicitPlanPass(plan)
    else:
        planner = SearchPass()
    return Pipeline([planner, KeepFloatPass(), CopyModelPass(), PreparePass(), LayoutPass(), CalibratePass(), RewritePass(), ValidatePass(),
                     MeasurePass()])


def quantize(
    model: str | os.PathLike[str] | onnx.ModelProto,
    calibration: Any,
    spec: str | os.PathLike[str] | HardwareSpec = "ort-cpu-x86",
    *,
    precision: str | None = None,
    plan: str | os.PathLike[str] | Mapping[str, str | Candidate] | None = None,
    max_drop: float = 0.01,
    exclude: Sequence[str] | None = None,
    options: QuantizeOptions | None = None,
) -> QuantizeResult:
    """Quantize ``model`` for ``spec`` and return the model and its report.

    Args:
        model: a path or a ``ModelProto`` (never modified).
        calibration: a ``.npz`` path, a folder of ``.npz`` feeds, an iterable of
            ``dict[str, np.ndarray]``, or an onnxruntime ``CalibrationDataReader``.
        spec: a built-in spec name, a spec JSON path, or a loaded :class:`HardwareSpec`.
        precision: uniform candidate (``"int8/uint8"``); no search.
        plan: an explicit plan (path to plan JSON, or a mapping layer → candidate); no search.
        max_drop: accuracy-degradation range for the search (default mode).
        exclude: layers kept in fp32 in every mode: layer names, ``"re:PATTERN"`` (the whole
            name must match) or ``"op:TYPE"`` (e.g. ``["head/Gemm", "re:.*attn.*", "op:Gather"]``).
        options: every other option; ``precision``/``plan``/``max_drop``/``exclude`` override its fields.
    """
    started = time.perf_counter()
    opts = options or QuantizeOptions()
    explicit_plan: dict[str, Candidate] | None = None
    if plan is not None:
        if isinstance(plan, Mapping):
            explicit_plan = {str(k): v if isinstance(v, Candidate) else Candidate.parse(str(v)) for k, v in plan.items()}
            opts = replace(opts, plan_path="<mapping>", precision=None)
        else:
            explicit_plan, _ = read_plan(plan)
            opts = replace(opts, plan_path=str(plan), precision=None)
    if precision is not None:
        opts = replace(opts, precision=precision, plan_path=None)
    if options is None or max_drop != 0.01:
        opts = replace(opts, max_drop=max_drop)
    if opts.mode == "plan" and explicit_plan is None and opts.plan_path:
        explicit_plan, _ = read_plan(opts.plan_path)
    if exclude is not None:
        opts = replace(opts, exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude))
    if opts.precision is not None:
        Candidate.parse(opts.precision)  # fail early on a bad name
    opts.exclusions()  # fail early on a bad pattern

    hw = spec if isinstance(spec, HardwareSpec) else load_spec(spec)
    loaded = load_model(model)
    check_quantizable_dtypes(loaded.proto)
    load_seconds = time.perf_counter() - started
    feeds = load_feeds(calibration, loaded.proto, batch_size=opts.batch_size)
    working = loaded.proto  # shared with the fp32 reference until CopyModelPass
    ctx = PassContext(model=working, options=opts)
    ctx.artifacts.update({"spec": hw, "feeds": feeds, "fp32_model": loaded.proto, "model_sha256": loaded.sha256,
                          "fp32_path": loaded.path})
    ensure_unique_node_names(working)
    ctx.analyses.register("graph_view", lambda c: graph_view_for(c.model, hw, weights=c.artifacts.get("weight_source")))
    ctx.analyses.register("scope_views", lambda c: scope_views_for(c.model, hw))
    ctx.add_time("load", load_seconds)
    view = ctx.analysis("graph_view")
    if not view.layers and not any(sv.view.layers for sv in ctx.analysis("scope_views")):
        raise UsageError("the model has nothing to quantize (no Conv, Gemm, MatMul or embedding Gather in float)",
                         "onnxq quantizes float compute layers; check the model with `onnxq inspect`")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in working.graph.node):
        raise UsageError("the model is already quantized (it contains Q/DQ or QLinear nodes)",
                         "pass the fp32 model that it was made from")
    ctx.artifacts["keep_float"] = _keep_float(ctx, hw, opts)
    pipeline = build_pipeline(opts, explicit_plan)
    pipeline.run(ctx)
    report = build_report(ctx, hw, opts, time.perf_counter() - started, str(pipeline))
    return QuantizeResult(model=ctx.model, report=report, target_met=report["target_met"])


def _keep_float(ctx: PassContext, spec: HardwareSpec, opts: QuantizeOptions) -> frozenset[str]:
    """The layers ``--exclude`` keeps float (main graph and control-flow subgraphs)."""
    patterns = opts.exclusions()
    if not patterns:
        return frozenset()
    layers = [(name, layer.op_type) for name, layer in ctx.analysis("graph_view").layers.items()]
    layers += [(name, layer.op_type) for sv in ctx.analysis("scope_views") for name, layer in sv.view.layers.items()]
    keep = excluded_layers(patterns, layers)
    if spec.integer_only:
        raise UsageError(f"spec {spec.name} is integer-only: it has no float to keep {', '.join(sorted(keep)[:5])} in",
                         "drop --exclude, or choose a spec with float fallback")
    logger.info("--exclude keeps %d layer(s) in fp32", len(keep))
    return keep


def _recurrent_notes(model: onnx.ModelProto) -> dict[str, str]:
    """Recurrent ops (LSTM/GRU/RNN) stay float: no runtime fuses Q/DQ around them."""
    notes = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in ("LSTM", "GRU", "RNN"):
                notes[node.name] = (f"{node.op_type} kept in fp32: onnxruntime has no QDQ fusion for recurrent ops; "
                                    "the layers around it are quantized")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(model.graph)
    return notes


def build_report(ctx: PassContext, spec: HardwareSpec, opts: QuantizeOptions, seconds: float, pipeline: str) -> dict[str, Any]:
    plan: dict[str, Candidate] = ctx.artifacts["plan"]
    measurement = dict(ctx.artifacts.get("measurement", {}))
    fp32 = ctx.artifacts["fp32_model"]
    layers_total = len(graph_view_for(fp32, spec).layers)
    layers_total += sum(len(sv.view.layers) for sv in scope_views_for(fp32, spec))
    quantized = {n: c for n, c in plan.items() if not c.is_float or c.weights.value == "fp16"}
    report: dict[str, Any] = {
        "format": "onnxq-report/1",
        "onnxq_version": __version__,
        "spec": spec.name,
        "mode": opts.mode,
        "pipeline": pipeline,
        "plan": plan_to_json(plan, spec.name),
        "layers": {"total": layers_total, "quantized": len(quantized), "by_candidate": plan_summary(quantized),
                   "fp32": layers_total - len(quantized)},
        "metric": {k: measurement[k] for k in ("name", "fp32", "quantized", "drop", "max_drop", "interval95") if k in measurement},
        "sizes": {"fp32_bytes": measurement.get("size_fp32"), "quantized_bytes": measurement.get("size_quantized")},
        "latency": measurement.get("latency", {}),
        "calibration": {"method": opts.calibration, "samples": ctx.artifacts["feeds"].samples,
                        "held_back_feeds": len(ctx.artifacts["feeds"].held_back)},
        "notes": {**ctx.artifacts.get("plan_notes", {}), **_recurrent_notes(fp32)},
        "time_per_phase": {k: round(v, 4) for k, v in ctx.timings.items()},
        "seconds": round(seconds, 3),
    }
    for key in ("search", "cost", "pareto_front"):
        if key in ctx.artifacts:
            report[key] = ctx.artifacts[key]
    # the search's verdict on its predictions, then the checks on the written model (passes/measure.py)
    shortfalls = [s for s in (ctx.artifacts.get("search", {}).get("shortfall"),) if s] + ctx.artifacts.get("shortfalls", [])
    report["target_met"] = bool(ctx.artifacts.get("target_met", True)) and not shortfalls
    if shortfalls:
        report["shortfall"] = "; ".join(shortfalls)
    return report
