"""`create_app(runs_dir)`: the Dash head explorer over one runs directory; `serve(...)`: run it.

It binds to 127.0.0.1 unless told otherwise, picks a free port when given port 0, opens no
browser, reads only inside the runs directory (through `RunStore`) and unpickles nothing.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

from dash import Dash, dcc, html

from headlab.runs import RunStore

from .callbacks import register
from .context import AppContext
from .models import ModelCache
from .tasks import TaskManager

log = logging.getLogger("headlab.app")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
NAV = [("Runs", "/"), ("Heatmap", "/heatmap"), ("Compare", "/compare"), ("Playground", "/playground"),
       ("New run", "/new")]


def create_app(runs_dir: str | Path, models: list[str] | None = None, workers: int = 2, device: str = "cpu",
               allow_hub: bool = False, allowed_hosts: list[str] | None = None) -> Dash:
    """The app for `runs_dir`. `models` adds model references the playground may load (besides the
    zoo and the models the runs name), loaded on `device`; hub names load only with `allow_hub`.
    Requests whose Host header names another host than this machine (or `allowed_hosts`) are
    refused — a page of another site cannot reach the app through DNS rebinding.
    `app.headlab` is its `AppContext`."""
    # Dash 4 announces DataTable's future removal on every table; it is still built in and works
    warnings.filterwarnings("ignore", message=r"\s*The dash_table.DataTable will be removed", category=DeprecationWarning)
    store = RunStore(runs_dir)
    ctx = AppContext(store=store, models=ModelCache(store, models, device, allow_hub), tasks=TaskManager(workers=workers))
    app = Dash(__name__, title="headlab", suppress_callback_exceptions=True, serve_locally=True,
               assets_folder=str(Path(__file__).parent / "assets"), update_title=None)
    app.layout = html.Div([
        dcc.Location(id="url", refresh="callback-nav"),
        dcc.Store(id="rendered-path"),
        html.Header([html.Span("headlab", className="brand")]
                    + [dcc.Link(name, href=href, className="nav", id=f"nav-{name.lower()}") for name, href in NAV],
                    className="top"),
        html.Main(id="page-content"),
    ])
    register(app, ctx)
    _check_host_header(app, allowed_hosts)
    app.headlab = ctx  # type: ignore[attr-defined]
    return app


def _check_host_header(app: Dash, allowed_hosts: list[str] | None) -> None:
    from flask import abort, request

    hosts = {h.lower() for h in (*LOCAL_HOSTS, *(allowed_hosts or []))}

    @app.server.before_request
    def host_allowed():
        host = (request.host or "").lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name not in hosts:
            abort(400, description=f"Host {host!r} is not this app's (allowed: {', '.join(sorted(hosts))}); "
                                   "start it with the host name you use")


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 0, models: list[str] | None = None,
          device: str = "cpu", ready: Callable[[str], None] | None = None, allow_hub: bool = False,
          allowed_hosts: list[str] | None = None) -> None:
    """Serve the app until interrupted; `ready(url)` is called once it listens (port 0: a free port)."""
    from werkzeug.serving import make_server

    extra_hosts = list(allowed_hosts or []) + ([host] if host not in LOCAL_HOSTS and host not in ("0.0.0.0", "::") else [])
    app = create_app(runs_dir, models, device=device, allow_hub=allow_hub, allowed_hosts=extra_hosts)
    if host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this machine can read the runs and run models", host)
    server = make_server(host, port, app.server, threaded=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{server.server_port}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.headlab.tasks.shutdown()  # type: ignore[attr-defined]
