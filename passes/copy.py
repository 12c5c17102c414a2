"""Give the pipeline its own copy of the model before the first pass that rewrites it."""

from __future__ import annotations

import onnx

from onnxq.pipeline import Pass, PassContext

__all__ = ["CopyModelPass"]


class CopyModelPass(Pass):
    """Replace ``ctx.model`` by a copy when it is the fp32 reference (artifact ``fp32_model``).

    The passes before it only read the model: the search analyses and measures plans against
    the one fp32 model the run holds, so a model of hundreds of MB is held once, not twice,
    through the longest phase of the run. Every later pass rewrites the copy.
    """

    name = "copy"
    preserves = frozenset()

    def run(self, ctx: PassContext) -> bool:
        if ctx.model is not ctx.artifacts.get("fp32_model"):
            return False
        copy = onnx.ModelProto()
        copy.CopyFrom(ctx.model)
        ctx.model = copy
        return True
