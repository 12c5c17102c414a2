"""Decide where Q/DQ go for the plan (an analysis of the plan; the model is not touched)."""

from __future__ import annotations

from onnxq.layout import plan_layout
from onnxq.pipeline import ALL, Pass, PassContext

__all__ = ["LayoutPass"]


class LayoutPass(Pass):
    """The main graph's layout, and one per control-flow subgraph that has planned layers."""

    name = "layout"
    requires = ("plan", "spec")
    produces = ("layout",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        plan, spec = ctx.artifacts["plan"], ctx.artifacts["spec"]
        ctx.artifacts["layout"] = plan_layout(ctx.analysis("graph_view"), plan, spec)
        scoped = []
        for sv in ctx.analysis("scope_views"):
            if any(name in sv.view.layers for name in plan):
                scoped.append((sv.scope, plan_layout(sv.view, plan, spec)))
        ctx.artifacts["scope_layouts"] = scoped
        return False
