"""Keep the layers the user excluded (``--exclude``) in float, whatever planned them."""

from __future__ import annotations

import logging

from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import Candidate

__all__ = ["KeepFloatPass"]

logger = logging.getLogger(__name__)


class KeepFloatPass(Pass):
    """Drop the user's excluded layers (artifact ``keep_float``) from the plan: unplanned layers
    stay fp32. The search already leaves them out of its space; a uniform precision or an
    explicit plan is filtered here, and the user is told which layers the exclusion overrode."""

    name = "keep-float"
    requires = ("plan",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        keep: frozenset[str] = ctx.artifacts.get("keep_float", frozenset())
        plan: dict[str, Candidate] = ctx.artifacts["plan"]
        overridden = sorted(name for name, candidate in plan.items() if name in keep and not candidate.is_float)
        if overridden and ctx.options.mode == "plan":
            logger.warning("--exclude keeps %d layer(s) of the plan in fp32: %s", len(overridden),
                           ", ".join(overridden[:5]) + (" …" if len(overridden) > 5 else ""))
        ctx.artifacts["plan"] = {name: c for name, c in plan.items() if name not in keep}
        notes = dict(ctx.artifacts.get("plan_notes", {}))
        notes.update({name: "kept in fp32 by --exclude" for name in sorted(keep)})
        ctx.artifacts["plan_notes"] = notes
        return False
