"""The Dash head explorer (`headlab app RUNS_DIR`): runs, heatmaps with a mask control, comparison,
head detail, intervention playground and mask export, thin over the library.

Needs the `app` extra (`pip install "headlab[app]"`, which brings dash).
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See `headlab.app.server.create_app` (imported lazily, so `import headlab` never needs dash)."""
    from .server import create_app as _create

    return _create(*args, **kwargs)


def serve(*args, **kwargs):
    from .server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
