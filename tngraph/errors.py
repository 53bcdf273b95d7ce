"""Error types that name the problem and the fix; the CLI prints them as one line."""
from __future__ import annotations


class TngraphError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)


class ConfigError(TngraphError, ValueError):
    """An option is unknown or out of range."""


class CaptureError(TngraphError):
    """The model could not be captured as an FX graph."""


class ModelError(TngraphError):
    """The model (name, folder or weights) cannot be used."""


class DataError(TngraphError):
    """Calibration or evaluation data is missing or malformed."""


class ArtifactError(TngraphError):
    """A saved artifact is missing, corrupt, or does not belong to this model."""


class PassError(TngraphError):
    """A pass failed; the message names it and the passes that ran before it."""


class ExportError(TngraphError):
    """An export (ONNX, TensorRT) failed or did not reproduce the model; nothing was written."""
