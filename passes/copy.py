"""Give the pipeline its own copy of the model before the first pass that rewrites it."""

from __future__ import annotations

from onnxq.model import rewritable_copy
from onnxq.pipeline import Pass, PassContext

__all__ = ["CopyModelPass"]


class CopyModelPass(Pass):
    """Replace ``ctx.model`` by its :func:`~onnxq.model.rewritable_copy` when it is the fp32
    reference (artifact ``fp32_model``), with the reference's tensors as ``weight_source``.

    The passes before it only read the model: the search analyses and measures plans against
    the one fp32 model the run holds, so a model of hundreds of MB is held once, not twice,
    through the longest phase of the run. Every later pass rewrites the copy; it reads weights
    from the source, and the rewrite copies in those the written model keeps (protobuf frees
    a message's memory only with the message: a whole copy, rewritten, held the fp32 weights
    until the end of the run).
    """

    name = "copy"
    preserves = frozenset()

    def run(self, ctx: PassContext) -> bool:
        if ctx.model is not ctx.artifacts.get("fp32_model"):
            return False
        ctx.model, ctx.artifacts["weight_source"] = rewritable_copy(ctx.model)
        return True
