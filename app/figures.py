"""Plotly figures and HTML views of library results (presentation only: every number comes from
headlab's HeadScores, HeadMask, compare, headview and playground)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from dash import html
from plotly.subplots import make_subplots

from headlab.mask import HeadMask
from headlab.scores import HeadScores

MASK_COLOUR = "#e4572e"


MAX_HEIGHT = 760
"""Tallest heatmap (px): 80 layers fit a laptop screen with the controls above them."""


def heatmap(scores: HeadScores, mask: HeadMask | None = None, title: str | None = None) -> go.Figure:
    """The scores' layer × head heatmap (hover: score, rank, count), the mask's heads outlined —
    all outlines one trace (one path with gaps), so any mask draws at once."""
    fig = scores.plot(title)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for layer, head in (mask or []):
        xs += [head - 0.5, head + 0.5, head + 0.5, head - 0.5, head - 0.5, None]
        ys += [layer - 0.5, layer - 0.5, layer + 0.5, layer + 0.5, layer - 0.5, None]
    if xs:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": MASK_COLOUR, "width": 2.5}, hoverinfo="skip",
                                 showlegend=False, name="mask"))
    L, H = scores.shape
    fig.update_layout(margin={"l": 50, "r": 20, "t": 50, "b": 40}, height=min(140 + 42 * L, MAX_HEIGHT),
                      yaxis={"autorange": "reversed", "dtick": 1 if L <= 40 else 5, "range": [L - 0.5, -0.5]},
                      xaxis={"dtick": 1 if H <= 40 else 4, "range": [-0.5, H - 0.5]}, clickmode="event")
    return fig


def _percentile(scores: HeadScores) -> list[list[float | None]]:
    """Per head: the fraction of measured heads it beats, ties sharing their value (None: unmeasured)."""
    v = scores.values
    n = int((~v.isnan()).sum())
    r = scores.tied_ranks()
    return [[None if rank == 0 else 1.0 - (rank - 1) / max(n - 1, 1) for rank in row] for row in r.tolist()]


def compare_grid(scores: Sequence[HeadScores], names: Sequence[str], scale: str = "rank") -> go.Figure:
    """Side-by-side heatmaps on one colour axis: `scale` "rank" (percentile, 1 = best head of each
    score) or "score" (raw values, one shared min/max)."""
    fig = make_subplots(rows=1, cols=len(scores), subplot_titles=list(names), horizontal_spacing=0.04)
    for i, s in enumerate(scores):
        z = _percentile(s) if scale == "rank" else [[None if x != x else x for x in row] for row in s.values.tolist()]
        custom = [[[v] for v in row] for row in s.values.tolist()]
        fig.add_trace(go.Heatmap(z=z, customdata=custom, coloraxis="coloraxis",
                                 hovertemplate="layer %{y} head %{x}<br>score %{customdata[0]:.4g}<br>"
                                               + ("percentile %{z:.2f}" if scale == "rank" else "") + "<extra></extra>"),
                      row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", dtick=1, row=1, col=i + 1)
        fig.update_xaxes(dtick=1, row=1, col=i + 1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "percentile" if scale == "rank" else "score"}},
                      height=160 + 40 * scores[0].shape[0], margin={"l": 40, "r": 20, "t": 60, "b": 40})
    return fig


def scatter(x: HeadScores, y: HeadScores, x_name: str, y_name: str, k: int) -> go.Figure:
    """One point per head: score `x` against score `y`; each score's top-k heads coloured."""
    from headlab.compare import top_set

    xs, ys = x.values.flatten().tolist(), y.values.flatten().tolist()
    H = x.shape[1]
    tx, ty = top_set(x, k), top_set(y, k)
    groups = {(True, True): "top-k of both", (True, False): f"top-k of {x_name}", (False, True): f"top-k of {y_name}",
              (False, False): "other heads"}
    fig = go.Figure()
    for key, label in groups.items():
        idx = [i for i in range(len(xs)) if ((i // H, i % H) in tx, (i // H, i % H) in ty) == key]
        fig.add_trace(go.Scatter(x=[xs[i] for i in idx], y=[ys[i] for i in idx], mode="markers", name=label,
                                 text=[f"L{i // H}H{i % H}" for i in idx],
                                 hovertemplate="%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>"))
    fig.update_layout(xaxis_title=x_name, yaxis_title=y_name, height=420, margin={"l": 50, "r": 20, "t": 30, "b": 50})
    return fig


def histogram(values: Sequence[float], name: str) -> go.Figure:
    fig = go.Figure(go.Histogram(x=list(values), nbinsx=20, marker={"color": "#3b75af"}))
    fig.update_layout(xaxis_title=name, yaxis_title="samples", height=260, margin={"l": 50, "r": 20, "t": 20, "b": 40},
                      bargap=0.05)
    return fig


def per_query(view: dict[str, Any]) -> go.Figure:
    """Per query: attention entropy and the top key's probability."""
    q = list(range(len(view["entropy"])))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=q, y=view["entropy"], name="entropy (nats)", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=q, y=view["argmax_prob"], name="top key probability", mode="lines+markers", yaxis="y2",
                             text=[f"top key {k}: {view['tokens'][k]}" for k in view["argmax"]],
                             hovertemplate="query %{x}<br>%{text}<br>p %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="query position", yaxis={"title": "entropy"},
                      yaxis2={"title": "top-1 prob", "overlaying": "y", "side": "right", "range": [0, 1]},
                      height=260, margin={"l": 50, "r": 50, "t": 20, "b": 40}, legend={"orientation": "h"})
    return fig


def token_view(view: dict[str, Any], field: str = "row", spans: dict[str, list[int]] | None = None) -> html.Div:
    """The input's tokens, each shaded by its attention (`row`: from the chosen query; `received_mean`:
    received on average); the query is boxed, named spans underlined."""
    values = view[field]
    top = max(values) if values and max(values) > 0 else 1.0
    in_span = {}
    for name, (a, b) in (spans or {}).items():
        for p in range(a, b):
            in_span.setdefault(p, name)
    pieces = []
    for pos, (tok, v) in enumerate(zip(view["tokens"], values)):
        style = {"backgroundColor": f"rgba(228, 87, 46, {0.05 + 0.95 * v / top:.3f})" if v > 0 else "transparent"}
        cls = "tok"
        if pos == view["query_position"] and field == "row":
            cls += " tok-query"
        if pos in in_span:
            cls += " tok-span"
        pieces.append(html.Span(tok, className=cls, style=style, title=f"{pos}: {tok!r} {v:.4f}"
                                + (f" (span {in_span[pos]})" if pos in in_span else "")))
    return html.Div(pieces, className="tokens", id="head-token-view")


def next_token_bars(changes: Sequence[dict[str, Any]]) -> go.Figure:
    toks = [c["token"] for c in changes]
    fig = go.Figure([go.Bar(name="baseline", x=toks, y=[c["p_baseline"] for c in changes]),
                     go.Bar(name="patched", x=toks, y=[c["p_patched"] for c in changes])])
    fig.update_layout(barmode="group", yaxis_title="next-token probability", height=320,
                      margin={"l": 50, "r": 20, "t": 20, "b": 60})
    return fig


def _labels(tokens: Sequence[str], start: int = 0) -> list[str]:
    return [f"{start + i}: {t}" for i, t in enumerate(tokens)]


def layer_thumbnails(view: dict[str, Any]) -> go.Figure:
    """Every head of the layer on one input: each row is a head's attention from the chosen query
    over the tokens (from the stats, one row per head), the viewed head outlined."""
    rows = view["layer_rows"]
    labels = _labels(view["tokens"])
    fig = go.Figure(go.Heatmap(z=rows, x=list(range(len(labels))), y=list(range(len(rows))), customdata=[labels] * len(rows),
                               colorscale="Viridis", colorbar={"title": {"text": "attention"}},
                               hovertemplate="head %{y}<br>key %{customdata}<br>%{z:.4f}<extra></extra>"))
    h = view["head"]
    fig.add_shape(type="rect", x0=-0.5, x1=len(labels) - 0.5, y0=h - 0.5, y1=h + 0.5, line={"color": MASK_COLOUR, "width": 2})
    fig.update_layout(height=120 + 18 * len(rows), margin={"l": 50, "r": 20, "t": 20, "b": 40}, xaxis_title="key position",
                      yaxis={"title": "head", "autorange": "reversed", "dtick": 1 if len(rows) <= 32 else 4})
    return fig


def window_matrix(view: dict[str, Any]) -> go.Figure:
    """The head's query × key attention among the tokens of the window ending at the query."""
    w0, m = view["window_start"], view["window_matrix"]
    labels = _labels(view["tokens"][w0:w0 + len(m)], w0)
    fig = go.Figure(go.Heatmap(z=m, x=labels, y=labels, colorscale="Viridis", colorbar={"title": {"text": "attention"}},
                               hovertemplate="query %{y}<br>key %{x}<br>%{z:.4f}<extra></extra>"))
    fig.update_layout(height=200 + 9 * len(m), margin={"l": 120, "r": 20, "t": 20, "b": 120},
                      xaxis={"title": "key", "tickfont": {"size": 9}},
                      yaxis={"title": "query", "autorange": "reversed", "tickfont": {"size": 9}})
    return fig


def image_overlay(view: dict[str, Any]) -> go.Figure | None:
    """The example image with the chosen query's attention on its patch tokens laid over it (a
    square grid of image tokens, row-major, as LLaVA-style processors order them); None when the
    view has no image or its tokens do not form a square grid."""
    import math

    uri, span = view.get("image_uri"), (view.get("spans") or {}).get("image")
    if not uri or not span:
        return None
    a, b = span
    g = math.isqrt(b - a)
    if g * g != b - a:
        return None
    attn = view["row"][a:b]
    grid = [attn[r * g:(r + 1) * g] for r in range(g)]
    fig = go.Figure(go.Heatmap(z=grid, x0=0, dx=1, y0=0, dy=1, colorscale="Hot", opacity=0.55, reversescale=True,
                               colorbar={"title": {"text": "attention"}},
                               hovertemplate="patch row %{y} col %{x}<br>%{z:.4f}<extra></extra>"))
    fig.add_layout_image(source=uri, x=-0.5, y=-0.5, sizex=g, sizey=g, xref="x", yref="y", sizing="stretch",
                         layer="below", xanchor="left", yanchor="top")
    fig.update_layout(height=360, width=420, margin={"l": 30, "r": 20, "t": 20, "b": 30},
                      xaxis={"range": [-0.5, g - 0.5], "showgrid": False, "constrain": "domain"},
                      yaxis={"range": [g - 0.5, -0.5], "showgrid": False, "scaleanchor": "x"})
    return fig
