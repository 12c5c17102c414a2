"""Passes that produce a precision plan without search: uniform and explicit (``--plan``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import onnx

from onnxq.errors import PlanError
from onnxq.graph import GraphView, Layer
from onnxq.layout import effective_candidate, layer_form_problem
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import FP32, Candidate
from onnxq.spec.model import HardwareSpec

__all__ = ["closest_candidate", "UniformPlanPass", "ExplicitPlanPass", "PLAN_FORMAT", "read_plan", "plan_to_json", "check_plan", "all_layers", "all_nodes"]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "onnxq-plan/1"


def plan_to_json(plan: Mapping[str, Candidate], spec_name: str) -> dict[str, object]:
    return {"format": PLAN_FORMAT, "spec": spec_name, "layers": {name: str(plan[name]) for name in plan}}


def read_plan(path: str | Path) -> tuple[dict[str, Candidate], str | None]:
    """Read a plan file (or a report that contains one)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {str(path)!r} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"plan file {str(path)!r} is not valid JSON: {error}", "write it as in DESIGN.md: {\"format\": \"onnxq-plan/1\", \"layers\": {...}}") from error
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]  # a report: its plan is accepted back
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("layers"), dict):
        raise PlanError(f"{str(path)!r} is not an {PLAN_FORMAT} plan", "it needs \"format\": \"onnxq-plan/1\" and a \"layers\" object")
    plan = {str(name): Candidate.parse(str(text)) for name, text in data["layers"].items()}
    spec = data.get("spec")
    return plan, (str(spec) if spec is not None else None)


def all_layers(ctx: PassContext) -> dict[str, Layer]:
    """Layers of the main graph and of every control-flow subgraph, by name."""
    layers = dict(ctx.analysis("graph_view").layers)
    for scoped in ctx.analysis("scope_views"):
        layers.update(scoped.view.layers)
    return layers


def all_nodes(ctx: PassContext) -> dict[str, onnx.NodeProto]:
    """The nodes of the main graph and of every control-flow subgraph, by name."""
    nodes = dict(ctx.analysis("graph_view").nodes)
    for scoped in ctx.analysis("scope_views"):
        nodes.update(scoped.view.nodes)
    return nodes


def check_plan(plan: Mapping[str, Candidate], view: GraphView | Mapping[str, Layer], spec: HardwareSpec,
               nodes: Mapping[str, onnx.NodeProto] | None = None) -> None:
    """Reject layers the model lacks, candidates the spec does not allow and weight forms the
    rewrite has no pattern for, naming them all."""
    layers: Mapping[str, Layer] = view.layers if isinstance(view, GraphView) else view
    if nodes is None and isinstance(view, GraphView):
        nodes = view.nodes
    unknown = sorted(name for name in plan if name not in layers)
    if unknown:
        raise PlanError(f"plan names layers the model does not have: {', '.join(unknown[:8])}" + (" …" if len(unknown) > 8 else ""),
                        "run `onnxq inspect MODEL` for the layer names")
    bad = []
    for name, candidate in plan.items():
        layer = layers[name]
        effective = effective_candidate(layer.weight is not None, candidate)
        if candidate != FP32 and not spec.allows(layer.op_type, effective) and not spec.allows(layer.op_type, candidate):
            bad.append(f"{name} ({layer.op_type}: {candidate})")
    if bad:
        raise PlanError(f"spec {spec.name} does not allow: {', '.join(bad[:8])}" + (" …" if len(bad) > 8 else ""),
                        f"choose candidates the spec lists (onnxq spec-check / the spec file of {spec.name})")
    unwritable = [f"{name} ({problem})" for name, candidate in sorted(plan.items())
                  if (problem := layer_form_problem(layers[name], (nodes or {}).get(name), candidate))]
    if unwritable:
        raise PlanError(f"no Q/DQ form for: {', '.join(unwritable[:8])}" + (" …" if len(unwritable) > 8 else ""),
                        "give these layers a static (per-channel) or float candidate")
    if spec.integer_only:
        floats = sorted(name for name in layers if plan.get(name, FP32).is_float)
        if floats:
            raise PlanError(f"spec {spec.name} is integer-only but the plan keeps layers in float: {', '.join(floats[:8])}",
                            "give every layer an integer candidate")


def closest_candidate(layer: Layer, candidate: Candidate, spec: HardwareSpec,
                      node: onnx.NodeProto | None = None) -> Candidate | None:
    """``candidate`` for ``layer`` if the spec allows it and the rewrite can write it, else the
    closest allowed one (same weight format, e.g. weight-only int8 for an embedding Gather, or
    static int8 for a layer with no dynamic form; any integer one on an integer-only target),
    else None (the layer stays float)."""
    wanted = effective_candidate(layer.weight is not None, candidate)
    if layer_form_problem(layer, node, wanted) is None:
        if spec.allows(layer.op_type, wanted):
            return wanted
        if spec.allows(layer.op_type, candidate):
            return candidate
    allowed = [c for c in spec.candidates_for(layer.op_type) if not c.is_float and layer_form_problem(layer, node, c) is None]
    same_weights = [c for c in allowed if c.weights == wanted.weights]
    if same_weights:
        return same_weights[0]
    if spec.integer_only and allowed:
        return allowed[0]
    return None


class UniformPlanPass(Pass):
    """Every layer takes the same candidate where the spec allows it; the rest stay float."""

    name = "plan-uniform"
    produces = ("plan",)
    preserves = ALL

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate

    def run(self, ctx: PassContext) -> bool:
        spec: HardwareSpec = ctx.artifacts["spec"]
        plan: dict[str, Candidate] = {}
        kept: list[str] = []
        nodes = all_nodes(ctx)
        for name, layer in all_layers(ctx).items():
            chosen = closest_candidate(layer, self.candidate, spec, nodes.get(name))
            if chosen is None:
                kept.append(name)
            else:
                plan[name] = chosen
        if not plan:
            raise PlanError(f"no layer of this model can take {self.candidate} on spec {spec.name}",
                            "choose a precision the spec lists, e.g. int8/uint8 on ort-cpu-x86")
        if kept:
            logger.info("%d layer(s) stay fp32 (spec %s does not run them at %s): %s", len(kept), spec.name,
                        self.candidate, ", ".join(kept[:5]) + (" …" if len(kept) > 5 else ""))
        ctx.artifacts["plan"] = plan
        ctx.artifacts["plan_notes"] = {name: f"{self.candidate} not allowed by the spec for this op" for name in kept}
        return False


class ExplicitPlanPass(Pass):
    """Apply a plan given by the user (``--plan``), checked against the model and the spec."""

    name = "plan-explicit"
    produces = ("plan",)
    preserves = ALL

    def __init__(self, plan: Mapping[str, Candidate]) -> None:
        self.plan = dict(plan)

    def run(self, ctx: PassContext) -> bool:
        spec: HardwareSpec = ctx.artifacts["spec"]
        layers = all_layers(ctx)
        check_plan(self.plan, layers, spec, all_nodes(ctx))
        ctx.artifacts["plan"] = {name: effective_candidate(layers[name].weight is not None, c) for name, c in self.plan.items()}
        return False
