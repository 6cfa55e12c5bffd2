"""The `headlab` command line: thin over the library, generated from the analyses' declarations.

`headlab score|intervene|evaluate <analysis>` has one subcommand per declared analysis
(`headlab.registry`), with one option per parameter of its job; `headlab study run` runs a study
file; `headlab app` and `headlab demo` come from the entry-point group `headlab.commands`. No
analysis is listed here.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from headlab import registry
from headlab.errors import HeadlabError

app = typer.Typer(help="headlab: find, score and intervene on attention heads.", no_args_is_help=True, add_completion=False)
COMMANDS_GROUP = "headlab.commands"


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _guarded(fn: Any) -> Any:
    """`fn` with HeadlabErrors as a one-line message and exit code 2, Ctrl-C as 130."""
    import functools

    @functools.wraps(fn)
    def call(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except HeadlabError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            typer.secho("interrupted: finished work is kept; rerun the same command (same --run-id) to resume", err=True)
            raise typer.Exit(code=130)

    return call


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


GROUPS = {"score": "Score every head; writes a resumable run directory.",
          "intervene": "Calibrate an intervention on a calibration split, evaluate it on the rest.",
          "evaluate": "Evaluate what an earlier run found (e.g. prune its top heads vs random heads)."}


def _option(p: registry.Param) -> inspect.Parameter:
    """The typer option of one declared parameter."""
    annotation = list[p.item_type] if p.is_list else p.type  # type: ignore[valid-type]
    if p.optional or p.is_list:
        annotation = Optional[annotation]
    help = p.help + (f" [{'|'.join(map(str, p.choices))}]" if p.choices and "|" not in p.help else "")
    default = ... if p.required else (None if p.is_list and not p.default else p.default)
    return inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, p.cli_flag, help=help))


def _command(decl: registry.Declaration) -> Any:
    """A typer command running `decl`'s job and printing its summary."""
    from headlab import jobs

    def command(model: str, out: Path, run_id: Optional[str], device: str, dtype: str, **params: Any) -> None:
        params = {k: (v or None) if decl.param(k).is_list else v for k, v in params.items()}  # no --x given: the default
        try:
            run_dir = jobs.run(decl.name, model, out, run_id, device=device, dtype=dtype, **params)
        except registry.ParamError as exc:  # named as the user typed it
            raise HeadlabError(f"{decl.param(exc.key).cli_flag} {exc.detail}") from None
        typer.echo((run_dir / "summary.json").read_text())
        typer.echo(f"run written to {run_dir}")

    common = [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                          default=typer.Argument(..., help="local model directory, hub name, or zoo:<name>")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(Path("runs"), help="runs directory")),
        inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, help="name of the run; an unfinished run of that name is resumed")),
        inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("cpu", help="where the model runs: cpu, cuda, cuda:1, ...")),
        inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("float32", help="the model's precision: float32 | bfloat16 | float16")),
    ]
    command.__signature__ = inspect.Signature(common + [_option(p) for p in decl.params])  # type: ignore[attr-defined]
    command.__doc__ = decl.summary + (f"\n\nData: {decl.datasets}." if decl.datasets else "")
    command.__name__ = decl.name
    return _guarded(command)


def _build() -> None:
    for kind, help in GROUPS.items():
        group = typer.Typer(help=help, no_args_is_help=True)
        for decl in registry.declarations(kind):
            group.command(decl.command)(_command(decl))
        app.add_typer(group, name=kind)
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        app.command(ep.name)(_guarded(ep.load()))


study_app = typer.Typer(help="Reproducible studies: a model, analyses, interventions, evaluations and seeds in one file.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("run")
def study_run(
    file: Path = typer.Argument(..., help="the study file (studies/<name>.toml)"),
    out: Optional[Path] = typer.Option(None, help="study directory (default: studies-out/<name>, '-small' appended "
                                                  "for --size small); an unfinished one is resumed"),
    size: str = typer.Option("full", help="full (the file's parameters) | small (its [small] overrides: minutes on a CPU)"),
    plotlyjs: str = typer.Option("inline", help="report.html's plotly.js: inline (works offline) | cdn (small file)"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Run (or resume) a study: every run inside one study directory, report.md, report.html and a manifest."""
    from headlab import study

    try:
        result = study.run(file, out, size=size, plotlyjs=plotlyjs, progress=progress)
    except HeadlabError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished runs are kept; rerun the same command to resume", err=True)
        raise typer.Exit(code=130)
    typer.echo(result.report_md.read_text())
    typer.echo(f"study written to {result.dir}")


@study_app.command("check")
def study_check(file: Path = typer.Argument(..., help="the study file")) -> None:
    """Check a study file (analyses, parameters, data files) without running it."""
    from headlab import study

    try:
        s = study.load(file)
    except HeadlabError as exc:
        _fail(exc)
    typer.echo(f"{file}: {len(s.steps)} steps on {s.model}, seeds {list(s.seeds)}: ok")


@app.command()
def version() -> None:
    """Print headlab's and its main dependencies' versions."""
    from headlab.runs import versions

    for name, v in versions().items():
        typer.echo(f"{name} {v}")


_build()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="headlab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
