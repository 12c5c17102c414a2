"""Decide where Q/DQ go for the plan (an analysis of the plan; the model is not touched)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from onnxq.layout import Layout, plan_layout
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.subgraphs import Scope

__all__ = ["LayoutPass", "plan_layouts"]


def plan_layouts(ctx: PassContext, keep_float: AbstractSet[str] = frozenset()) -> tuple[Layout, list[tuple[Scope, Layout]]]:
    """The main graph's layout, and one per control-flow subgraph that has planned layers."""
    plan, spec = ctx.artifacts["plan"], ctx.artifacts["spec"]
    main = plan_layout(ctx.analysis("graph_view"), plan, spec, keep_float)
    scoped = []
    for sv in ctx.analysis("scope_views"):
        if any(name in sv.view.layers for name in plan):
            scoped.append((sv.scope, plan_layout(sv.view, plan, spec, keep_float)))
    return main, scoped


class LayoutPass(Pass):
    """The main graph's layout, and one per control-flow subgraph that has planned layers."""

    name = "layout"
    requires = ("plan", "spec")
    produces = ("layout",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        ctx.artifacts["layout"], ctx.artifacts["scope_layouts"] = plan_layouts(ctx)
        return False
