"""Typed errors. Each message is one line that names the problem and the fix; the CLI prints it and exits 2."""


class DiffrtError(Exception):
    """Base class for every error diffrt raises on purpose."""


class BadInput(DiffrtError):
    """The user gave something diffrt cannot use (path, checkpoint, option, request). `field` names the request
    field at fault where there is one (the HTTP service reports it)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnsupportedModel(BadInput):
    """A recognised checkpoint of a family or architecture diffrt does not support (yet)."""


class ValidationFailed(DiffrtError):
    """An exported graph disagrees with its PyTorch module beyond the stated tolerance."""


class NonFiniteOutput(DiffrtError):
    """A component produced NaN or inf; the message names the component."""
