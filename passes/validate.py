"""The last word before writing: onnx.checker, an onnxruntime session, and the spec."""

from __future__ import annotations

import logging

import onnx

from onnxq.errors import PassError, UsageError
from onnxq.model import is_large
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.runtime import make_session
from onnxq.validate import NO_INTEGER_FORM, validate_model

__all__ = ["ValidatePass"]

logger = logging.getLogger(__name__)


class ValidatePass(Pass):
    """Refuse to hand out a model that fails the checker, does not load, or violates the spec."""

    name = "validate"
    requires = ("spec",)
    produces = ("violations",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        try:
            if not is_large(ctx.model):
                onnx.checker.check_model(ctx.model, full_check=True)
        except onnx.checker.ValidationError as error:
            first = str(error).strip().splitlines()[0]
            raise PassError(f"the quantized model fails onnx.checker: {first}", "report this model to onnxq") from error
        # the spec first: a model its target cannot run is named as such, whatever onnxruntime's
        # optimizer makes of it on this machine
        violations = validate_model(ctx.model, ctx.artifacts["spec"])
        ctx.artifacts["violations"] = violations
        spec = ctx.artifacts["spec"]
        missing = sorted({v.op_type: v.node for v in violations if v.allowed.startswith(NO_INTEGER_FORM)}.items())
        if spec.integer_only and missing:  # not a planning fault: the target cannot run the model
            ops = ", ".join(f"{op} (node {node})" for op, node in missing[:5])
            raise UsageError(f"spec {spec.name} runs integer ops only and has none for {ops}: this model cannot "
                             "run on that target", "use a spec with a float fallback (e.g. ort-cpu-x86) or a "
                             "spec that declares these ops")
        if violations:
            listing = "; ".join(str(v) for v in violations[:5])
            raise PassError(f"the quantized model violates spec {ctx.artifacts['spec'].name}: {listing}"
                            + (f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""),
                            "report this to onnxq: the plan should never allow it")
        ctx.artifacts["session"] = make_session(ctx.model)
        return False
