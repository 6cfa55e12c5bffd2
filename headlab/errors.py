"""Errors headlab raises on bad input. Each message names the problem and the fix."""

from __future__ import annotations


class HeadlabError(Exception):
    """Base class of every error headlab raises on purpose."""


class PlanError(HeadlabError, ValueError):
    """An InterventionPlan or StatsRequest does not fit the model or the input."""


class UnsupportedArchitectureError(HeadlabError, NotImplementedError):
    """The model's attention cannot be routed through headlab's patched attention."""


class ModelNotFoundError(HeadlabError, FileNotFoundError):
    """A model path or hub name could not be found or loaded."""


class InputFileError(HeadlabError, ValueError):
    """A file given to headlab cannot be read as what it should be; the message names the file,
    the problem ("not UTF-8 text", "not a safetensors file", ...) and what the file should hold."""


class RunLockedError(HeadlabError):
    """Another live process is writing the same run directory."""
