"""Page layouts. Each takes the app context and the URL's query parameters; the values they show
first come from the library (runs, scores, examples); callbacks fill in the rest."""

from __future__ import annotations

from typing import Any

from dash import dash_table, dcc, html

from headlab.errors import HeadlabError

from headlab.report import before_after

from .context import MAX_TEXT_CHARS, SEP, AppContext, as_int

PLAN_KINDS = [
    {"label": "prune (output × 0)", "value": "prune"},
    {"label": "scale output × α", "value": "scale"},
    {"label": "ZeroTuning γ on the first token", "value": "first_token"},
    {"label": "ACT β (sink calibration)", "value": "act"},
]
RUN_COLUMNS = ["open", "id", "analysis", "model", "dataset", "params", "started", "duration_s", "status", "scores", "problem"]


def error_box(message: str | None, id: str | None = None) -> html.Div:
    kw = {"id": id} if id else {}
    return html.Div(message or "", className="error", **kw)  # hidden by CSS while empty


def progress_bar(prefix: str) -> html.Div:
    return html.Div([html.Progress(id=f"{prefix}-progress", value="0", max="1"),
                     html.Span("", id=f"{prefix}-progress-text", className="progress-text")], className="progress")


def runs_rows(ctx: AppContext) -> list[dict[str, Any]]:
    rows = ctx.store.table()
    for r in rows:
        links = [f"[heatmap](/heatmap?run={r['id']})"] if r["scores"] else []
        if r["status"] != "unreadable":
            links.append(f"[results](/run?run={r['id']})")
        r["open"] = " · ".join(links)
    return rows


def run_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    """One run: what it was, and its results — before / after tables for interventions."""
    import json

    run = params.get("run", "")
    m = ctx.store.manifest(run)
    try:
        summary, problem = ctx.store.summary(run), ""
    except HeadlabError as exc:
        summary, problem = {}, f"this run's summary cannot be read ({exc})"
    rows = before_after(summary)
    return html.Div([
        html.H2(f"Run {run}"),
        html.P(f"{m.get('analysis')} on {m.get('model')} · {m.get('status')} · started {m.get('started', '')}"),
        error_box(problem, "run-problem"),
        html.H3("Before / after"),
        dash_table.DataTable(id="run-before-after", data=rows,
                             columns=[{"name": c, "id": c} for c in ("metric", "before", "after", "change", "random heads")],
                             style_cell={"textAlign": "left", "fontSize": 13})
        if rows else html.P("This run reports no before / after numbers (a scoring run: see its heatmap).", className="hint",
                            id="run-before-after"),
        html.H3("Summary"),
        html.Pre(json.dumps(summary, indent=1, default=str)[:20_000], id="run-summary", className="summary"),
    ])


def runs_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    return html.Div([
        html.H2("Runs"),
        html.P(["Run directories in ", html.Code(str(ctx.store.root)), " (new runs appear by themselves)."]),
        dcc.Interval(id="runs-refresh", interval=2000),
        dash_table.DataTable(
            id="runs-table", data=runs_rows(ctx),
            columns=[{"name": c, "id": c, **({"presentation": "markdown"} if c == "open" else {})} for c in RUN_COLUMNS],
            filter_action="native", sort_action="native", page_size=25,
            style_table={"overflowX": "auto"},
            style_cell={"textAlign": "left", "fontSize": 13, "maxWidth": 220, "overflow": "hidden", "textOverflow": "ellipsis"},
            style_data_conditional=[{"if": {"filter_query": '{status} = "failed"', "column_id": "status"}, "color": "#c0392b"},
                                    {"if": {"filter_query": '{status} = "unreadable"'}, "color": "#c0392b",
                                     "backgroundColor": "#fdecea"},
                                    {"if": {"filter_query": '{status} = "interrupted"', "column_id": "status"}, "color": "#d68910"}],
            tooltip_duration=None,
        ),
    ])


def _runs_with_scores(ctx: AppContext) -> list[dict[str, str]]:
    return [{"label": f"{r['analysis']} · {r['model']} · {r['started'][:16]} ({r['id']})", "value": r["id"]}
            for r in ctx.store.table() if r["scores"]]


def heatmap_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    runs = _runs_with_scores(ctx)
    if params.get("run"):
        ctx.store.scores(params["run"])  # a bad or crafted id: the HeadlabError is the page
    run = params.get("run") or (runs[0]["value"] if runs else None)
    mode = params.get("mode", "top_k")
    return html.Div([
        html.H2("Heatmap"),
        html.Div([
            html.Label(["run", dcc.Dropdown(id="heatmap-run", options=runs, value=run, clearable=False)]),
            html.Label(["score", dcc.Dropdown(id="heatmap-score", value=params.get("score"), clearable=False)]),
        ], className="row"),
        html.Div([
            dcc.RadioItems(id="heatmap-mode", options=[{"label": "top-k", "value": "top_k"},
                                                        {"label": "threshold", "value": "threshold"}],
                           value=mode if mode in ("top_k", "threshold") else "top_k", inline=True),
            html.Label(["k ", dcc.Input(id="heatmap-k", type="number", min=0, step=1, value=params.get("k", 5))]),
            html.Label(["threshold ", dcc.Input(id="heatmap-threshold", type="number", value=params.get("threshold", 0.1))]),
        ], className="row controls"),
        error_box(None, "heatmap-error"),
        # The mask and its exports sit above the figure: with 80 layers they stay on screen.
        html.Div([
            html.Span("export mask: "),
            html.Button("JSON", id="export-json"), html.Button("safetensors", id="export-safetensors"),
            html.Button("DuoAttention TSV", id="export-duo"),
            dcc.Link("→ try this mask in the playground", id="heatmap-playground", href="/playground"),
        ], className="row export"),
        html.Div(id="heatmap-mask", className="mask"),
        html.P("Click a head to see where it attends. Grey: not measured.", className="hint"),
        dcc.Graph(id="heatmap-graph", config={"displaylogo": False}),
        dcc.Download(id="export-download"),
    ])


def compare_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    options = ctx.score_options()
    chosen = [v for v in params.get("scores", "").split(",") if v] or _default_comparison(ctx, options)
    return html.Div([
        html.H2("Compare"),
        html.Label(["scores (two or more, of one model)",
                    dcc.Dropdown(id="compare-scores", options=options, value=chosen, multi=True)]),
        html.Div([
            html.Label(["top-k ", dcc.Input(id="compare-k", type="number", min=1, step=1, value=params.get("k", 5))]),
            dcc.RadioItems(id="compare-scale", options=[{"label": "rank percentile", "value": "rank"},
                                                         {"label": "raw score (shared range)", "value": "score"}],
                           value="rank", inline=True),
        ], className="row controls"),
        error_box(None, "compare-error"),
        dcc.Graph(id="compare-grid", config={"displaylogo": False}),
        html.H3("Overlap and rank correlation"),
        dash_table.DataTable(id="compare-table", columns=[{"name": c, "id": c} for c in
                                                          ("a", "b", "k", "shared_topk", "jaccard_topk", "spearman", "note")],
                             style_cell={"textAlign": "left", "fontSize": 13}),
        html.H3("One score against another, per head"),
        html.Div([html.Label(["x", dcc.Dropdown(id="compare-x", clearable=False)]),
                  html.Label(["y", dcc.Dropdown(id="compare-y", clearable=False)])], className="row"),
        dcc.Graph(id="compare-scatter", config={"displaylogo": False}),
    ])


def _default_comparison(ctx: AppContext, options: list[dict[str, str]]) -> list[str]:
    """Up to three scores of different analyses on the newest run's model."""
    rows = {r["id"]: r for r in ctx.store.table()}
    if not options:
        return []
    model = rows[options[0]["value"].split(SEP)[0]]["model"]
    chosen, seen = [], set()
    for o in options:
        row = rows[o["value"].split(SEP)[0]]
        if row["model"] == model and row["analysis"] not in seen:
            chosen.append(o["value"])
            seen.add(row["analysis"])
    return chosen[:3]


def head_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    run = params.get("run", "")
    manifest = ctx.store.manifest(run)  # validates the run id (HeadlabError names the problem)
    scores = ctx.store.scores(run)
    if not scores:
        raise HeadlabError(f"run {run!r} has no head scores to show")
    name = params.get("score") if params.get("score") in scores else next(iter(scores))
    L, H = scores[name].shape
    layer, head = as_int(params.get("layer"), "layer", 0, L - 1), as_int(params.get("head"), "head", 0, H - 1)
    rows = []
    for n, s in scores.items():
        rows.append({"score": n, "analysis": s.analysis, "value": f"{s[(layer, head)]:.4g}",
                     "rank": f"{int(s.ranks()[layer, head]) + 1} of {L * H}"})
    try:
        examples, examples_problem = ctx.store.examples(run), ""
    except HeadlabError as exc:  # a corrupt examples file: the page works on your own text
        examples, examples_problem = [], f"this run's example inputs cannot be read ({exc}); type your own text"
    ex_options = [{"label": ex.get("label") or f"example {i}", "value": str(i)} for i, ex in enumerate(examples)]
    ex_options.append({"label": "my own text", "value": "custom"})
    return html.Div([
        dcc.Store(id="head-ref", data={"run": run, "score": name, "layer": layer, "head": head, "model": manifest.get("model")}),
        html.H2(f"Head L{layer}H{head}"),
        html.P([f"{manifest.get('analysis')} run on {manifest.get('model')} · ",
                dcc.Link("back to the heatmap", href=f"/heatmap?run={run}&score={name}")]),
        dash_table.DataTable(id="head-scores", data=rows, columns=[{"name": c, "id": c} for c in ("score", "analysis", "value", "rank")],
                             style_cell={"textAlign": "left", "fontSize": 13}),
        html.H3(f"Score distribution over the run's samples ({name})"),
        html.Div(id="head-distribution"),
        html.H3("Where it attends"),
        html.Div([
            html.Label(["input", dcc.Dropdown(id="head-example", options=ex_options,
                                              value=ex_options[0]["value"], clearable=False)]),
            html.Label(["query position ", dcc.Input(id="head-query", type="number", step=1, value=-1)]),
            dcc.RadioItems(id="head-view-mode", options=[{"label": "attention of the query", "value": "row"},
                                                          {"label": "mean received attention", "value": "received_mean"}],
                           value="row", inline=True),
        ], className="row controls"),
        error_box(examples_problem, "head-examples-problem"),
        dcc.Textarea(id="head-text", value=examples[0]["text"] if examples else "", className="prompt", maxLength=MAX_TEXT_CHARS),
        html.Button("Compute", id="head-compute"),
        html.Span(f" loads {manifest.get('model')} on first use", className="hint"),
        dcc.Store(id="head-task"), dcc.Interval(id="head-poll", interval=300, disabled=True),
        progress_bar("head"),
        error_box(None, "head-error"),
        html.Div(id="head-tokens"),
        html.H4("Top attended tokens of the query"),
        dash_table.DataTable(id="head-top", columns=[{"name": c, "id": c} for c in ("position", "token", "probability")],
                             style_cell={"textAlign": "left", "fontSize": 13}),
        dcc.Graph(id="head-per-query", config={"displaylogo": False}),
        html.Div(id="head-views"),
    ])


def playground_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    models = ctx.models.text_models()
    source = params.get("source")
    run_id = ctx.load_score(source)[0] if source else None  # checks the reference names a run's scores
    model = params.get("model") or (ctx.store.manifest(run_id).get("model") if run_id else None) or (models[0] if models else None)
    prompt = params.get("prompt", "")
    if not prompt and run_id:
        examples = ctx.store.examples(run_id)
        prompt = examples[0]["text"] if examples else ""
    mode = params.get("mode", "top_k")
    return html.Div([
        html.H2("Playground"),
        html.Div([
            html.Label(["model", dcc.Dropdown(id="pg-model", options=models, value=model, clearable=False)]),
            html.Label(["heads from", dcc.Dropdown(id="pg-source", options=ctx.score_options(), value=source)]),
        ], className="row"),
        html.Div([
            dcc.RadioItems(id="pg-mode", options=[{"label": "top-k", "value": "top_k"}, {"label": "threshold", "value": "threshold"}],
                           value=mode if mode in ("top_k", "threshold") else "top_k", inline=True),
            html.Label(["k ", dcc.Input(id="pg-k", type="number", min=0, step=1, value=params.get("k", 3))]),
            html.Label(["threshold ", dcc.Input(id="pg-threshold", type="number", value=params.get("threshold", 0.1))]),
        ], className="row controls"),
        html.Div([
            html.Label(["intervention", dcc.Dropdown(id="pg-kind", options=PLAN_KINDS, value=params.get("kind", "prune"),
                                                     clearable=False)]),
            html.Label(["value (α, γ or β) ", dcc.Input(id="pg-value", type="number", value=params.get("value", 0.0))]),
            html.Label(["new tokens ", dcc.Input(id="pg-max-new", type="number", min=0, max=256, step=1, value=12)]),
        ], className="row controls"),
        html.Div(id="pg-mask", className="mask"),
        dcc.Textarea(id="pg-prompt", value=prompt, className="prompt", placeholder="a prompt", maxLength=MAX_TEXT_CHARS),
        html.Button("Run baseline vs patched", id="pg-run"),
        dcc.Store(id="pg-task"), dcc.Interval(id="pg-poll", interval=300, disabled=True),
        progress_bar("pg"),
        error_box(None, "pg-error"),
        html.Div(id="pg-result"),
    ])


def new_run_page(ctx: AppContext, params: dict[str, str]) -> html.Div:
    """Start a run of any declared analysis (the form is generated from its declaration)."""
    from .newrun import analysis_options

    options = analysis_options()
    chosen = params.get("analysis") if params.get("analysis") in {o["value"] for o in options} else "sinks"
    return html.Div([
        html.H2("New run"),
        html.P(["Runs any analysis into ", html.Code(str(ctx.store.root)), "; the form comes from the analysis's "
                "declaration. Data files are the CLI's and studies' (the app reads nothing outside its runs directory): "
                "here each analysis uses the bundled models' own data."], className="hint"),
        html.Div([
            html.Label(["analysis", dcc.Dropdown(id="new-analysis", options=options, value=chosen, clearable=False)]),
            html.Label(["model", dcc.Dropdown(id="new-model", options=ctx.models.allowed(), value=params.get("model"),
                                              placeholder="a zoo or local model")]),
        ], className="row"),
        html.Div(id="new-about", className="hint"),
        html.Div(id="new-params", className="params"),
        html.Button("Start run", id="new-start"),
        dcc.Store(id="new-task"), dcc.Interval(id="new-poll", interval=500, disabled=True),
        progress_bar("new"),
        error_box(None, "new-error"),
        html.Div(id="new-result"),
    ])


PAGES = {"/": runs_page, "/runs": runs_page, "/heatmap": heatmap_page, "/compare": compare_page,
         "/head": head_page, "/playground": playground_page, "/run": run_page,
         "/new": new_run_page}
