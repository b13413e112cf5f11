"""Errors the harness reports to the user as one line, without a traceback."""

from __future__ import annotations


class HarnessError(Exception):
    """A problem the user can fix: its message names the problem and the fix."""


class ConfigError(HarnessError):
    """A config value is out of range, of the wrong type, or unknown."""


class DataError(HarnessError):
    """A dataset file is missing, truncated or corrupt, or cannot be downloaded."""


class ContextError(HarnessError):
    """The requested MXNet context (GPU) is not available."""


class TrackingError(HarnessError):
    """The MLflow tracking store cannot be reached or used."""
