"""The `headlab` command line: thin over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from headlab.errors import HeadlabError

app = typer.Typer(help="headlab: find, score and intervene on attention heads.", no_args_is_help=True, add_completion=False)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def info(
    model: str = typer.Argument(..., help="local model directory, hub name, or zoo:<name>"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code (off by default)"),
    revision: Optional[str] = typer.Option(None, help="hub revision"),
) -> None:
    """Print a model's ModelSpec and which patched-attention kernel it runs."""
    from headlab.model import load_model

    try:
        hm = load_model(model, trust_remote_code=trust_remote_code, revision=revision, load_tokenizer=False)
    except HeadlabError as exc:
        _fail(exc)
    typer.echo(hm.info())


@app.command()
def demo(
    out: Path = typer.Option(Path("runs"), help="runs directory to write into"),
    seed: int = typer.Option(1, help="which needle prompt (pruning the head breaks ~3 in 4 of them, per the card)"),
) -> None:
    """Patched forward + generation with an intervention and stats on the zoo model; prints a per-head table, writes a run."""
    import pandas as pd

    from headlab.demo import run_demo

    try:
        result = run_demo(out=out, seed=seed)
    except HeadlabError as exc:
        _fail(exc)
    table = result.table
    wide = table.pivot_table(index=["layer", "head"], columns="run", values=["needle_mass", "first_mass", "entropy"])
    wide.columns = [f"{stat}:{run}" for stat, run in wide.columns]
    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.3f}".format):
        typer.echo(wide.reset_index().to_string(index=False))
    a = result.answers
    typer.echo(f"\nplan: {result.plan_text}")
    typer.echo(f"answer expected {a['expected']!r} | baseline {a['baseline']!r} | patched {a['patched']!r}")
    typer.echo(f"KL(patched || baseline) of the next token = {result.kl:.4g}")
    typer.echo(f"run written to {result.run_dir}")


@app.command()
def version() -> None:
    """Print headlab's and its main dependencies' versions."""
    from headlab.runs import versions

    for name, v in versions().items():
        typer.echo(f"{name} {v}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="headlab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
