"""Callbacks: read form values, call the library, render. A failure becomes a message in the page."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import plotly.graph_objects as go
from dash import ALL, Dash, Input, Output, State, ctx as trigger, dcc, html, no_update

from headlab.compare import compare
from headlab.errors import HeadlabError
from headlab.headview import head_view
from headlab.playground import compare_plan

from . import figures
from .context import AppContext, as_float, as_int, build_mask, check_text, check_tokens, mask_summary, query_params, split_ref
from .pages import PAGES, error_box, runs_rows
from .tasks import error_message

log = logging.getLogger("headlab.app")
URL_STATE_PAGES = ("/heatmap",)
"""Pages that keep their controls' state in the URL themselves (a search change there is not a new page)."""
EMPTY = go.Figure(layout={"height": 60, "margin": {"l": 0, "r": 0, "t": 0, "b": 0},
                          "xaxis": {"visible": False}, "yaxis": {"visible": False}})


def guarded(n_outputs: int, error_at: int) -> Callable:
    """Wrap a callback so that any exception fills output `error_at` with its message and leaves the
    other outputs as they were (a blank page or a traceback is never what the user sees)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001
                if not isinstance(exc, HeadlabError):
                    log.exception("callback %s failed", fn.__name__)
                out: list[Any] = [no_update] * n_outputs
                out[error_at] = error_message(exc)
                return out[0] if n_outputs == 1 else tuple(out)

        return inner

    return wrap


def _poll_outputs(task, render: Callable[[Any], tuple], n: int) -> tuple:
    """(progress value, progress text, poll disabled, error, *the n rendered outputs) of a polled task."""
    keep = (no_update,) * n
    if task.state in ("queued", "running"):
        return (str(task.progress), task.message, False, "") + keep
    if task.state == "error":
        return ("0", "", True, task.error) + keep
    if task.state == "cancelled":
        return ("0", "cancelled", True, "") + keep
    return ("1", "done", True, "") + tuple(render(task.result))


def _poll_callback(app: Dash, ctx: AppContext, prefix: str, render: Callable[[Any], tuple]) -> None:
    """The polling callback of a page whose task renders into `{prefix}-result`: progress bar,
    poll switch and error box from `_poll_outputs`, the result from `render`."""

    @app.callback(Output(f"{prefix}-progress", "value"), Output(f"{prefix}-progress-text", "children"),
                  Output(f"{prefix}-poll", "disabled", allow_duplicate=True),
                  Output(f"{prefix}-error", "children", allow_duplicate=True),
                  Output(f"{prefix}-result", "children"), Input(f"{prefix}-poll", "n_intervals"),
                  State(f"{prefix}-task", "data"), prevent_initial_call=True)
    @guarded(5, 3)
    def poll(_n, task_ref):
        if not task_ref:
            return "0", "", True, "", no_update
        return _poll_outputs(ctx.tasks.get(task_ref["id"]), render, 1)


def register(app: Dash, ctx: AppContext) -> None:
    # ---- routing -----------------------------------------------------------------------------
    @app.callback(Output("page-content", "children"), Output("rendered-path", "data"),
                  Input("url", "pathname"), Input("url", "search"), State("rendered-path", "data"))
    def route(pathname: str | None, search: str | None, rendered: str | None):
        if pathname == rendered and pathname in URL_STATE_PAGES and "url.pathname" not in trigger.triggered_prop_ids:
            return no_update, no_update  # the page wrote its own state into the URL: nothing to rebuild
        page = PAGES.get(pathname or "/")
        if page is None:
            return error_box(f"no page {pathname!r}: use the links above"), pathname
        try:
            return page(ctx, query_params(search)), pathname
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, HeadlabError):
                log.exception("page %s failed", pathname)
            return error_box(error_message(exc)), pathname

    # ---- runs --------------------------------------------------------------------------------
    @app.callback(Output("runs-table", "data"), Input("runs-refresh", "n_intervals"), State("runs-table", "data"),
                  prevent_initial_call=True)
    def refresh_runs(_: int, shown):
        rows = runs_rows(ctx)
        return no_update if rows == shown else rows  # unchanged: leave the table (and its scroll) alone

    # ---- heatmap -----------------------------------------------------------------------------
    @app.callback(Output("heatmap-score", "options"), Output("heatmap-score", "value"), Output("heatmap-error", "children"),
                  Input("heatmap-run", "value"), State("heatmap-score", "value"))
    @guarded(3, 2)
    def heatmap_scores(run: str | None, current: str | None):
        if not run:
            return [], None, "no run with head scores here yet: run `headlab demo` or `headlab score ...`"
        names = ctx.store.score_names(run)  # every listed score; a corrupt one says so when picked
        return names, current if current in names else (names[0] if names else None), ""

    @app.callback(Output("heatmap-graph", "figure"), Output("heatmap-mask", "children"), Output("heatmap-playground", "href"),
                  Output("heatmap-error", "children", allow_duplicate=True),
                  Input("heatmap-run", "value"), Input("heatmap-score", "value"), Input("heatmap-mode", "value"),
                  Input("heatmap-k", "value"), Input("heatmap-threshold", "value"), prevent_initial_call="initial_duplicate")
    @guarded(4, 3)
    def heatmap_figure(run, score, mode, k, threshold):
        if not run or not score:
            return EMPTY, "", "/playground", ""
        try:
            scores = ctx.store.score(run, score)
        except HeadlabError as exc:  # a corrupt or half-copied file: this score only, the page goes on
            return EMPTY, "", "/playground", f"cannot show {score!r} of run {run}: {exc}"
        mask = build_mask(scores, mode, k, threshold)
        query = {"source": f"{run}::{score}", "mode": mode, "k": k, "threshold": threshold}
        href = "/playground?" + urlencode({k: v for k, v in query.items() if v is not None})
        return figures.heatmap(scores, mask), mask_summary(mask), href, ""

    @app.callback(Output("url", "search", allow_duplicate=True), Input("heatmap-run", "value"), Input("heatmap-score", "value"),
                  Input("heatmap-mode", "value"), Input("heatmap-k", "value"), Input("heatmap-threshold", "value"),
                  State("url", "search"), prevent_initial_call=True)
    def heatmap_state(run, score, mode, k, threshold, current):
        """The view's state (run, score, mode, k, threshold) in the URL: a link or a reload shows the same view."""
        state = {key: v for key, v in (("run", run), ("score", score), ("mode", mode), ("k", k), ("threshold", threshold))
                 if v not in (None, "")}
        search = "?" + urlencode(state)
        return no_update if search == (current or "") else search

    @app.callback(Output("url", "href", allow_duplicate=True), Input("heatmap-graph", "clickData"),
                  State("heatmap-run", "value"), State("heatmap-score", "value"), prevent_initial_call=True)
    def open_head(click, run, score):
        if not click or not click.get("points"):
            return no_update
        point = click["points"][0]
        return "/head?" + urlencode({"run": run, "score": score, "layer": int(point["y"]), "head": int(point["x"])})

    @app.callback(Output("export-download", "data"), Output("heatmap-error", "children", allow_duplicate=True),
                  Input("export-json", "n_clicks"), Input("export-safetensors", "n_clicks"), Input("export-duo", "n_clicks"),
                  State("heatmap-run", "value"), State("heatmap-score", "value"), State("heatmap-mode", "value"),
                  State("heatmap-k", "value"), State("heatmap-threshold", "value"), prevent_initial_call=True)
    @guarded(2, 1)
    def export_mask(_j, _s, _d, run, score, mode, k, threshold):
        fmt = {"export-json": "json", "export-safetensors": "safetensors", "export-duo": "duo_attention"}[trigger.triggered_id]
        mask = build_mask(ctx.store.score(run, score), mode, k, threshold)
        name = f"mask-{run}-{score}{mask.EXPORT_FORMATS[fmt]}"
        with tempfile.TemporaryDirectory() as tmp:
            data = mask.export(Path(tmp) / name, fmt).read_bytes()
        return dcc.send_bytes(data, name), ""

    # ---- compare -----------------------------------------------------------------------------
    @app.callback(Output("compare-x", "options"), Output("compare-x", "value"), Output("compare-y", "options"),
                  Output("compare-y", "value"), Input("compare-scores", "value"), State("compare-scores", "options"),
                  State("compare-x", "value"), State("compare-y", "value"))
    def compare_axes(chosen, options, x, y):
        labels = {o["value"]: o["label"] for o in options or []}
        opts = [{"label": labels.get(v, v), "value": v} for v in chosen or []]
        values = [o["value"] for o in opts]
        x = x if x in values else (values[0] if values else None)
        y = y if y in values and y != x else next((v for v in values if v != x), None)
        return opts, x, opts, y

    @app.callback(Output("compare-grid", "figure"), Output("compare-table", "data"), Output("compare-scatter", "figure"),
                  Output("compare-error", "children"), Input("compare-scores", "value"), Input("compare-k", "value"),
                  Input("compare-scale", "value"), Input("compare-x", "value"), Input("compare-y", "value"))
    @guarded(4, 3)
    def compare_view(chosen, k, scale, x, y):
        if not chosen or len(chosen) < 2:
            return EMPTY, [], EMPTY, "pick two or more scores to compare"
        k = as_int(k, "top-k", 1)
        loaded = {ref: ctx.load_score(ref)[2] for ref in dict.fromkeys(chosen)}
        if len(loaded) < 2:
            return EMPTY, [], EMPTY, "pick two or more different scores to compare"
        short = _names(loaded)
        names = [short[ref] for ref in loaded]
        table = compare(list(loaded.values()), k=k, names=names)
        rows = [{**r, "jaccard_topk": _shown(r["jaccard_topk"]), "spearman": _shown(r["spearman"]),
                 "shared_topk": "—" if r["shared_topk"] is None or r["shared_topk"] != r["shared_topk"] else int(r["shared_topk"])}
                for r in table.to_dict("records")]
        grid = figures.compare_grid(list(loaded.values()), names, scale)
        sc = EMPTY
        if x in loaded and y in loaded and x != y:
            sc = figures.scatter(loaded[x], loaded[y], short[x], short[y], k)
        return grid, rows, sc, ""

    # ---- head detail -------------------------------------------------------------------------
    @app.callback(Output("head-distribution", "children"), Input("head-ref", "data"))
    @guarded(1, 0)
    def head_distribution(ref):
        per, names = ctx.store.per_sample(ref["run"])
        if ref["score"] not in per:
            return html.P("This run kept no per-sample scores for this score (only its mean per head).", className="hint")
        values = per[ref["score"]][:, ref["layer"], ref["head"]].tolist()
        return dcc.Graph(figure=figures.histogram(values, ref["score"]), config={"displaylogo": False}, id="head-hist")

    @app.callback(Output("head-text", "value"), Input("head-example", "value"), State("head-ref", "data"),
                  prevent_initial_call=True)
    def head_example_text(example, ref):
        if example in (None, "custom"):
            return no_update
        try:
            examples = ctx.store.examples(ref["run"])
            return examples[as_int(example, "example", 0, len(examples) - 1)]["text"]
        except HeadlabError:
            return no_update

    @app.callback(Output("head-task", "data"), Output("head-poll", "disabled"), Output("head-error", "children"),
                  Input("head-compute", "n_clicks"),
                  State("head-example", "value"), State("head-text", "value"), State("head-query", "value"),
                  State("head-ref", "data"), State("head-task", "data"), prevent_initial_call=True)
    @guarded(3, 2)
    def head_start(_clicks, example, text, query, ref, previous):
        """Load the run's model (first time only) and compute the head view — only on request."""
        spans, image = {}, None
        if example not in (None, "custom"):
            examples = ctx.store.examples(ref["run"])
            chosen = examples[as_int(example, "example", 0, len(examples) - 1)]
            if text == chosen["text"]:
                spans = chosen.get("spans", {})
                image = ctx.store.example_image(ref["run"], chosen)  # vision runs: the image tokens become a span
        q = as_int(query if query not in (None, "") else -1, "query position")
        text = check_text(text, "input text")
        ctx.tasks.cancel((previous or {}).get("id"))
        layer, head, model_ref = ref["layer"], ref["head"], ref["model"]

        def work(progress, should_stop):
            with ctx.models.use(model_ref, status=lambda message: progress(0.05, message)) as hm:
                check_tokens(hm, text)
                progress(0.3, f"two patched forwards, stats of layer {layer}")
                v = head_view(hm, text, layer, head, query=q, spans=spans, image=image)
            return {"tokens": v.tokens, "query_position": v.query_position, "row": v.row.tolist(),
                    "received_mean": v.received_mean.tolist(), "argmax": v.argmax.tolist(),
                    "argmax_prob": v.argmax_prob.tolist(), "entropy": v.entropy.tolist(),
                    "top": [{"position": p, "token": t, "probability": round(pr, 4)} for p, t, pr in v.top(10)],
                    "spans": {k: list(s) for k, s in {**spans, **v.spans}.items()}, "head": head,
                    "layer_rows": v.layer_rows.tolist(), "window_start": v.window_start,
                    "window_matrix": v.window_matrix.tolist(), "image_uri": _data_uri(image)}

        task_id = ctx.tasks.submit("head", work)
        return {"id": task_id}, False, ""

    def render_head(view, mode="row"):
        layer = html.Div([
            html.H4("All heads of the layer, from the same query"),
            dcc.Graph(figure=figures.layer_thumbnails(view), config={"displaylogo": False}, id="head-layer"),
            html.H4(f"This head among the last {len(view['window_matrix'])} tokens (query × key)"),
            dcc.Graph(figure=figures.window_matrix(view), config={"displaylogo": False}, id="head-window"),
        ])
        overlay = figures.image_overlay(view)
        if overlay is not None:
            layer.children = [html.H4("The query's attention on the image patches"),
                              dcc.Graph(figure=overlay, config={"displaylogo": False}, id="head-image")] + layer.children
        return (figures.token_view(view, mode, view.get("spans")), view["top"], figures.per_query(view), layer)

    @app.callback(Output("head-progress", "value"), Output("head-progress-text", "children"),
                  Output("head-poll", "disabled", allow_duplicate=True), Output("head-error", "children", allow_duplicate=True),
                  Output("head-tokens", "children"), Output("head-top", "data"), Output("head-per-query", "figure"),
                  Output("head-views", "children"),
                  Input("head-poll", "n_intervals"), Input("head-view-mode", "value"), State("head-task", "data"),
                  prevent_initial_call=True)
    @guarded(8, 3)
    def head_poll(_n, mode, task_ref):
        if not task_ref:
            return ("0", "", True, "") + (no_update,) * 4
        return _poll_outputs(ctx.tasks.get(task_ref["id"]), lambda view: render_head(view, mode), 4)

    # ---- playground --------------------------------------------------------------------------
    @app.callback(Output("pg-mask", "children"), Input("pg-source", "value"), Input("pg-mode", "value"),
                  Input("pg-k", "value"), Input("pg-threshold", "value"))
    def pg_mask(source, mode, k, threshold):
        if not source:
            return "pick the scores whose heads to intervene on"
        try:
            return "intervene on " + mask_summary(build_mask(ctx.load_score(source)[2], mode, k, threshold))
        except HeadlabError as exc:
            return str(exc)

    @app.callback(Output("pg-task", "data"), Output("pg-poll", "disabled"), Output("pg-error", "children"),
                  Output("pg-result", "children", allow_duplicate=True), Input("pg-run", "n_clicks"),
                  State("pg-model", "value"), State("pg-source", "value"), State("pg-mode", "value"), State("pg-k", "value"),
                  State("pg-threshold", "value"), State("pg-kind", "value"), State("pg-value", "value"),
                  State("pg-max-new", "value"), State("pg-prompt", "value"), State("pg-task", "data"), prevent_initial_call=True)
    def pg_start(_clicks, model_ref, source, mode, k, threshold, kind, value, max_new, prompt, previous):
        ctx.tasks.cancel((previous or {}).get("id"))  # a new request: the old result and task are gone either way
        try:
            return (*_pg_submit(model_ref, source, mode, k, threshold, kind, value, max_new, prompt), "")
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, HeadlabError):
                log.exception("playground request failed")
            return no_update, True, error_message(exc), ""

    def _pg_submit(model_ref, source, mode, k, threshold, kind, value, max_new, prompt):
        if not model_ref:
            raise HeadlabError("pick a model")
        if model_ref not in ctx.models.text_models():
            raise HeadlabError(ctx.models.why_not(model_ref) if model_ref not in ctx.models.allowed()
                               else f"{model_ref} needs an image; the playground takes text prompts only")
        if not source:
            raise HeadlabError("pick the scores whose heads to intervene on ('heads from')")
        scores = ctx.load_score(source)[2]
        if scores.model and scores.model != model_ref:
            raise HeadlabError(f"those heads were scored on {scores.model}, not {model_ref}: head numbers do not carry "
                               "over between models — pick that model, or scores from a run on this one")
        mask = build_mask(scores, mode, k, threshold)
        if not len(mask):
            raise HeadlabError("the mask selects no heads: raise k or lower the threshold")
        value = as_float(value, "value")
        if kind in ("scale", "first_token") and value < 0:
            raise HeadlabError(f"{kind} needs a value >= 0 (α or γ), got {value}")
        if kind == "act" and not 0 <= value <= 1:
            raise HeadlabError(f"ACT's β must be in [0, 1], got {value}")
        plan = mask.to_plan(kind, value)
        max_new = as_int(max_new, "new tokens", 0, 256)
        prompt = check_text(prompt, "prompt")

        def work(progress, should_stop):
            with ctx.models.use(model_ref, status=lambda message: progress(0.0, message)) as hm:
                if hm.spec.shape != (mask.n_layers, mask.n_heads):
                    raise HeadlabError(f"the mask is for {mask.n_layers} × {mask.n_heads} heads, {model_ref} has "
                                       f"{hm.spec.shape[0]} × {hm.spec.shape[1]}")
                check_tokens(hm, prompt)
                result = compare_plan(hm, prompt, plan, max_new_tokens=max_new, top_k=10, progress=progress,
                                      should_stop=should_stop)
            return {**result.to_dict(), "mask": mask_summary(mask), "kind": kind, "value": value}

        return {"id": ctx.tasks.submit("playground", work)}, False, ""

    def render_pg(result):
        what = {"prune": "pruned", "scale": f"output × {result['value']}", "first_token": f"ZeroTuning γ = {result['value']}",
                "act": f"ACT β = {result['value']}"}[result["kind"]]
        return (html.Div([
            html.P(f"{what} on {result['mask']} · KL(patched ‖ baseline) of the next token = {result['kl']:.4g} nats",
                   id="pg-kl"),
            html.Div([html.Div([html.H4("baseline"), html.Pre(result["baseline_text"] or "(nothing)", id="pg-baseline")],
                               className="half"),
                      html.Div([html.H4("patched"), html.Pre(result["patched_text"] or "(nothing)", id="pg-patched")],
                               className="half")], className="row"),
            dcc.Graph(figure=figures.next_token_bars(result["changes"]), config={"displaylogo": False}, id="pg-bars"),
        ]),)

    _poll_callback(app, ctx, "pg", render_pg)

    _register_new_run(app, ctx)


def _register_new_run(app: Dash, ctx: AppContext) -> None:
    from headlab import jobs, registry

    from . import newrun

    @app.callback(Output("new-params", "children"), Output("new-about", "children"), Input("new-analysis", "value"))
    def new_params(name):
        decl = registry.get(name)
        about = [html.Span(decl.summary), html.Br(), html.Span(f"Data: {decl.datasets}. Writes: {', '.join(decl.writes)}.")]
        return [newrun.field(p, ctx.store) for p in newrun.form_params(decl)], about

    @app.callback(Output("new-task", "data"), Output("new-poll", "disabled"), Output("new-error", "children"),
                  Output("new-result", "children", allow_duplicate=True), Input("new-start", "n_clicks"),
                  State("new-analysis", "value"), State("new-model", "value"),
                  State({"type": "new-param", "name": ALL}, "value"), State({"type": "new-param", "name": ALL}, "id"),
                  prevent_initial_call=True)
    def new_start(_clicks, name, model, values, ids):
        try:
            decl = registry.get(name)
            if not model:
                raise HeadlabError("pick a model")
            if model not in ctx.models.allowed():
                raise HeadlabError(ctx.models.why_not(model))
            params = newrun.parse(decl, {i["name"]: v for i, v in zip(ids, values)}, ctx.store)
            newrun.check_model(decl, model)
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, HeadlabError):
                log.exception("new run request failed")
            return no_update, True, error_message(exc), ""

        def work(progress, should_stop):
            progress(0.05, f"running {decl.name} on {model} (the run appears in the runs list when it starts)")
            return jobs.run(decl.name, model, ctx.store.root, progress=False, device=ctx.models.device, **params).name

        return {"id": ctx.tasks.submit(f"run:{decl.name}", work)}, False, "", ""

    def render_new(run_id):
        return (html.P(["finished: ", dcc.Link(f"run {run_id}", href=f"/run?run={run_id}", id="new-run-link")]),)

    _poll_callback(app, ctx, "new", render_new)


def _data_uri(image: Any) -> str | None:
    """A PIL image as a PNG data URI (for the overlay figure), None without one."""
    if image is None:
        return None
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _shown(x: float) -> Any:
    """A table number: rounded, or "—" where it is undefined (NaN), never a blank or a made-up 1.0."""
    return "—" if x != x else round(x, 3)


def _names(loaded: dict[str, Any]) -> dict[str, str]:
    """Short display names of score references: the score's name (its analysis for a run's plain
    "scores"), with the run id added where two would read the same."""
    base = {}
    for ref, scores in loaded.items():
        _, name = split_ref(ref)
        base[ref] = scores.analysis if name == "scores" else name
    counts = {n: list(base.values()).count(n) for n in base.values()}
    return {ref: n if counts[n] == 1 else f"{n} ({split_ref(ref)[0]})" for ref, n in base.items()}
