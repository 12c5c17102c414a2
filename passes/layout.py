"""Decide where Q/DQ go for the plan (an analysis of the plan; the model is not touched)."""

from __future__ import annotations

from onnxq.layout import plan_layout
from onnxq.pipeline import ALL, Pass, PassContext

__all__ = ["LayoutPass"]


class LayoutPass(Pass):
    name = "layout"
    requires = ("plan", "spec")
    produces = ("layout",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        ctx.artifacts["layout"] = plan_layout(ctx.analysis("graph_view"), ctx.artifacts["plan"], ctx.artifacts["spec"])
        return False
