"""Bring the model to the opset and IR version the plan's Q/DQ need."""

from __future__ import annotations

import logging

from onnxq.model import MAX_IR_VERSION, model_opset, upgrade_opset
from onnxq.pipeline import Pass, PassContext
from onnxq.precision import Candidate
from onnxq.spec.model import HardwareSpec

__all__ = ["PreparePass"]

logger = logging.getLogger(__name__)


class PreparePass(Pass):
    """Upgrade the opset when the plan needs it (per-channel: 13; int16/int4: 21)."""

    name = "prepare"
    requires = ("plan", "spec")
    preserves = frozenset()

    def run(self, ctx: PassContext) -> bool:
        plan: dict[str, Candidate] = ctx.artifacts["plan"]
        spec: HardwareSpec = ctx.artifacts["spec"]
        needed = 13  # per-channel weights and int32 bias DQ with axis
        for candidate in plan.values():
            if not candidate.is_float:
                needed = max(needed, spec.opset_needed(candidate, per_channel=True))
        current = model_opset(ctx.model)
        changed = False
        if current < needed:
            ctx.model = upgrade_opset(ctx.model, needed)
            changed = True
        if ctx.model.ir_version > MAX_IR_VERSION or ctx.model.ir_version < 7:
            ctx.model.ir_version = max(7, min(ctx.model.ir_version, MAX_IR_VERSION))
            if model_opset(ctx.model) >= 21:
                ctx.model.ir_version = 10
            changed = True
        elif model_opset(ctx.model) >= 21 and ctx.model.ir_version < 10:
            ctx.model.ir_version = 10
            changed = True
        return changed
