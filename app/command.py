"""`headlab app`: the CLI command that serves the explorer (found through the entry-point group
`headlab.commands`, so the core CLI never imports the app; dash is imported only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from headlab.errors import HeadlabError


def command(
    runs: Path = typer.Argument(Path("runs"), help="the runs directory to explore"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (default: this machine only)"),
    port: int = typer.Option(0, help="port (0: a free one)"),
    model: Optional[list[str]] = typer.Option(None, help="extra model the playground may load (repeat)"),
    device: str = typer.Option("cpu", help="where head detail and the playground run models (cpu, cuda, cuda:1)"),
    allow_hub: bool = typer.Option(False, help="let pages load hub model names (downloads); default: zoo and local dirs only"),
    allowed_host: Optional[list[str]] = typer.Option(None, help="extra Host header name to accept (repeat), e.g. a "
                                                               "machine name when serving on 0.0.0.0"),
) -> None:
    """The head explorer in the browser: runs, heatmaps, comparison, head detail, new runs, playground, mask export."""
    from headlab.app import serve  # dash itself is imported by serve

    try:
        serve(runs, host=host, port=port, models=model or None, device=device, allow_hub=allow_hub,
              allowed_hosts=allowed_host or None,
              ready=lambda url: typer.echo(f"headlab app: {runs} at {url} (Ctrl-C stops)"))
    except ModuleNotFoundError as exc:
        raise HeadlabError(f"the app needs {exc.name}: pip install 'headlab[app]'") from None
    except KeyboardInterrupt:
        typer.echo("stopped")
