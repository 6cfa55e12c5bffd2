"""The "New run" form, generated from the analyses' declarations (`headlab.registry`).

One field per declared parameter: a checkbox for a bool, a dropdown for a parameter with choices
or one naming an earlier run, a number box for a number, a text box for a string or a list
(comma-separated). Parameters the browser should not set are left to the CLI and studies: data
files and folders (the app reads nothing outside its runs directory) and Ray's options. The job
runs on the app's task pool through `headlab.jobs.run`, writing into the app's runs directory.
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from headlab import registry
from headlab.errors import HeadlabError
from headlab.runs import RunStore

SERVER_ONLY = ("ray", "shards", "ray_gpus")


def form_params(decl: registry.Declaration) -> list[registry.Param]:
    """The parameters the form shows."""
    return [p for p in decl.params if p.role not in ("file", "folder") and p.name not in SERVER_ONLY]


def analysis_options() -> list[dict[str, str]]:
    return [{"label": f"{d.kind} · {d.command} — {d.summary}", "value": d.name} for d in registry.declarations()]


def _run_options(store: RunStore) -> list[dict[str, str]]:
    return [{"label": f"{r['id']} ({r['analysis']} · {r['model']})", "value": r["id"]}
            for r in store.table() if r["status"] == "finished"]


def field(p: registry.Param, store: RunStore) -> html.Div:
    """The input of one parameter (id {"type": "new-param", "name": ...})."""
    key = {"type": "new-param", "name": p.name}
    if p.type is bool:
        widget: Any = dcc.Checklist(id=key, options=[{"label": "", "value": "on"}], value=["on"] if p.default else [])
    elif p.role == "run":
        widget = dcc.Dropdown(id=key, options=_run_options(store), placeholder="a finished run")
    elif p.choices:
        widget = dcc.Dropdown(id=key, options=[{"label": str(c), "value": c} for c in p.choices], value=p.default,
                              clearable=p.optional)
    elif p.type in (int, float) and not p.is_list:
        widget = dcc.Input(id=key, type="number", value=p.default, step=1 if p.type is int else "any")
    else:
        value = ", ".join(map(str, p.default)) if p.is_list and p.default else (p.default or "")
        widget = dcc.Input(id=key, type="text", value=value, placeholder="comma-separated" if p.is_list else "")
    label = p.name + ("" if not p.required else " (required)")
    return html.Div([html.Label([html.Span(label, className="param-name"), widget]),
                     html.Span(p.help, className="hint")], className="param")


def parse(decl: registry.Declaration, raw: dict[str, Any], store: RunStore) -> dict[str, Any]:
    """The form's values as the job's parameters, checked against the declaration. Empty fields
    keep the default; a bad value raises a HeadlabError naming the parameter."""
    params: dict[str, Any] = {}
    for p in form_params(decl):
        value = raw.get(p.name)
        if p.type is bool:
            params[p.name] = bool(value)
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if p.role == "run":
            params[p.name] = str(store.run_dir(str(value)))  # only runs of this app's directory
            continue
        if p.is_list:
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            try:
                params[p.name] = [p.item_type(v) for v in items]
            except ValueError:
                raise HeadlabError(f"{p.name}: expected {p.describe()}, got {value!r}") from None
            continue
        if p.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        params[p.name] = value
    try:
        return decl.check(params)
    except registry.ParamError as exc:
        raise HeadlabError(f"{exc.key}: {exc.detail}") from None


def check_model(decl: registry.Declaration, model: str) -> None:
    """Refuse a model of the wrong modality before a run is opened."""
    from headlab.model import load_spec

    if decl.modality == "any":
        return
    modality = load_spec(model).modality
    if modality != decl.modality:
        raise HeadlabError(f"{decl.name} needs a {decl.modality} model; {model} is a {modality} model")
