"""Insert Q/DQ (and fp16 Casts) at the planned precisions."""

from __future__ import annotations

import json
import logging

from onnxq.passes.plan import plan_to_json

from onnxq.calibration.weights import written_weight_ranges
from onnxq.model import fill_stubs, model_opset
from onnxq.pipeline import Pass, PassContext
from onnxq.rewrite import RewriteResult, apply_layout
from onnxq.subgraphs import unwrap, wrap
from onnxq.version import __version__

__all__ = ["RewritePass"]

logger = logging.getLogger(__name__)


class RewritePass(Pass):
    name = "rewrite"
    requires = ("layout", "ranges", "spec")
    produces = ("rewrite",)
    preserves = frozenset()

    def run(self, ctx: PassContext) -> bool:
        spec = ctx.artifacts["spec"]
        per_channel_ok = model_opset(ctx.model) >= 13
        ranges = ctx.artifacts["ranges"]
        quantized: dict[str, str] = {}
        weight_bytes = 0
        if ctx.artifacts.get("scope_layouts") and "weight_source" in ctx.artifacts:
            fill_stubs(ctx.model, ctx.artifacts.pop("weight_source"))  # subgraphs may read outer weights
        # innermost scopes first: an outer scope's wrapper then carries its rewritten children
        for scope, layout in sorted(ctx.artifacts.get("scope_layouts", []), key=lambda item: -item[0].depth):
            wrapper, wrapped = wrap(ctx.model, scope)
            scoped = apply_layout(wrapper, layout, ranges, spec, weight_ranges=written_weight_ranges, per_channel_ok=per_channel_ok)
            unwrap(ctx.model, scope, wrapper, wrapped)
            quantized.update(scoped.quantized_layers)
            weight_bytes += scoped.weight_bytes
        result = apply_layout(ctx.model, ctx.artifacts["layout"], ranges, spec,
                              weight_ranges=written_weight_ranges, per_channel_ok=per_channel_ok,
                              weights=ctx.artifacts.get("weight_source"))
        if "weight_source" in ctx.artifacts:  # the fp32 tensors the written model keeps (float layers)
            fill_stubs(ctx.model, ctx.artifacts.pop("weight_source"))
        if quantized:
            quantized.update(result.quantized_layers)
            result = RewriteResult(ctx.model, quantized, weight_bytes + result.weight_bytes)
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
