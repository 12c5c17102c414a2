"""Insert Q/DQ (and fp16 Casts) at the planned precisions."""

from __future__ import annotations

import json
import logging

from onnxq import __version__
from onnxq.calibration import weight_ranges
from onnxq.model import model_opset
from onnxq.pipeline import Pass, PassContext
from onnxq.passes.plan import plan_to_json
from onnxq.precision import Precision, bits
from onnxq.rewrite import apply_layout

__all__ = ["RewritePass"]

logger = logging.getLogger(__name__)


def _weight_ranges(w, axis, precision: Precision, symmetric: bool):  # type: ignore[no-untyped-def]
    # low bit widths lose most to outliers: pick the MSE-optimal clipping per channel there
    method = "mse" if bits(precision) <= 4 else "minmax"
    return weight_ranges(w, axis, precision, symmetric, method=method)


class RewritePass(Pass):
    name = "rewrite"
    requires = ("layout", "ranges", "spec")
    produces = ("rewrite",)
    preserves = frozenset()

    def run(self, ctx: PassContext) -> bool:
        spec = ctx.artifacts["spec"]
        result = apply_layout(ctx.model, ctx.artifacts["layout"], ctx.artifacts["ranges"], spec,
                              weight_ranges=_weight_ranges, per_channel_ok=model_opset(ctx.model) >= 13)
        meta = {p.key: p.value for p in ctx.model.metadata_props}
        meta.update({
            "onnxq.version": __version__,
            "onnxq.spec": spec.name,
            "onnxq.plan": json.dumps(plan_to_json(ctx.artifacts["plan"], spec.name), sort_keys=True),
        })
        del ctx.model.metadata_props[:]
        for key in sorted(meta):
            entry = ctx.model.metadata_props.add()
            entry.key, entry.value = key, meta[key]
        ctx.artifacts["rewrite"] = result
        return True
