"""User-facing errors: each message names the file or value and the problem."""

from __future__ import annotations


class PipelineError(Exception):
    """An error caused by the user's input or settings; the message names the file and the problem."""


class ConfigError(PipelineError):
    """A configuration file or override that cannot be turned into a valid config."""


class DataError(PipelineError):
    """Bad contest data: the message names the file and the problem."""


class UnknownNameError(PipelineError):
    """A name that no registry knows; the message lists the valid names."""
