"""Domain exceptions. The CLI turns each into a one-line message and a non-zero exit code."""

from __future__ import annotations


class SaloraError(Exception):
    """Base class of every error salora-merge reports to a user (never shown with a traceback)."""

    exit_code = 1


class InputError(SaloraError):
    """A file, folder or option given by the user is missing, malformed or unusable."""


class AdapterError(InputError):
    """An adapter is malformed, of an unsupported kind, or does not fit the base model."""


class ShapeMismatchError(AdapterError):
    """An adapter tensor does not fit the base model module it targets."""


class SafetyModuleError(InputError):
    """A safety module file is malformed or was computed for another base model."""


class OutputExistsError(InputError):
    """The output path exists and --overwrite was not given."""


class ModelResolutionError(InputError):
    """A base model reference could not be turned into a local folder."""


class GateFailed(SaloraError):
    """An audited adapter failed a configured threshold (a result, not a malfunction)."""

    exit_code = 3
