"""One error hierarchy for onnxq.

Every error a user can cause derives from :class:`OnnxqError`; the CLI turns it into one
line on stderr (``onnxq: error: <message> (<hint>)``) and exit code 2. Errors that mean
"the target could not be met" derive from :class:`TargetNotMetError` and exit with 1.
"""

from __future__ import annotations

__all__ = [
    "OnnxqError",
    "UsageError",
    "ModelError",
    "CalibrationError",
    "SpecError",
    "PlanError",
    "PassError",
    "TargetNotMetError",
]


class OnnxqError(Exception):
    """Base class of every error onnxq reports to a user.

    Args:
        message: what is wrong, naming the offending file, tensor or layer.
        hint: what the user can do about it (optional, shown after the message).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint folded into one line for stderr."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" — {' '.join(self.hint.split())}"
        return text


class UsageError(OnnxqError):
    """Bad command-line arguments or API arguments."""


class ModelError(OnnxqError):
    """The model file is missing, unreadable, invalid or unsupported."""


class CalibrationError(OnnxqError):
    """Calibration data is missing or does not match the model."""


class SpecError(OnnxqError):
    """A hardware spec is unknown or invalid."""


class PlanError(OnnxqError):
    """A precision plan is malformed or not allowed by the spec."""


class PassError(OnnxqError):
    """A compiler pass failed; the message names the pass and the pipeline before it."""


class TargetNotMetError(OnnxqError):
    """The search could not meet the requested target; the best model found was written."""

    exit_code = 1
