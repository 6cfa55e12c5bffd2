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
