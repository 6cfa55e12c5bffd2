"""`HeadScores`: a named [n_layers, n_heads] score with metadata, mergeable across processes."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from headlab.errors import HeadlabError, InputFileError
from headlab.mask import Head, HeadMask

FORMAT = "headlab.scores/1"


@dataclass(frozen=True)
class HeadScores:
    """Per-head scores of one analysis on one model.

    Stored as `sums` and `counts` ([n_layers, n_heads] float64) so that partial results from
    several processes merge exactly: score = sums / counts (NaN where a head has no count).
    `metadata` holds analysis, parameters, model id and revision, dataset fingerprint.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    analysis: str
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sums.dim() != 2 or self.sums.shape != self.counts.shape:
            raise HeadlabError(f"sums and counts must both be [n_layers, n_heads], got {tuple(self.sums.shape)} and {tuple(self.counts.shape)}")

    @classmethod
    def from_tensor(cls, values: torch.Tensor, analysis: str, *, counts: torch.Tensor | float = 1.0, **kw: Any) -> "HeadScores":
        """Scores from a [n_layers, n_heads] tensor of means (each backed by `counts` samples)."""
        values = torch.as_tensor(values).detach().to(torch.float64).cpu()
        c = torch.as_tensor(counts, dtype=torch.float64).expand_as(values).clone()
        return cls(sums=values * c, counts=c, analysis=analysis, **kw)

    # ---- values ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.sums.shape[0]), int(self.sums.shape[1]))

    @property
    def values(self) -> torch.Tensor:
        """[n_layers, n_heads] mean score (NaN where a head was never counted)."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1e-300), torch.full_like(self.sums, float("nan")))

    def __getitem__(self, head: Head) -> float:
        return float(self.values[head[0], head[1]])

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k highest-scoring heads as (layer, head, score), best first (NaN last)."""
        flat = torch.nan_to_num(self.values, nan=float("-inf")).flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:k]
        n_heads = self.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(self.values.flatten()[i])) for i in order]

    def ranks(self) -> torch.Tensor:
        """[n_layers, n_heads] rank of each head (0 = best)."""
        flat = torch.nan_to_num(self.values, nan=float("-inf")).flatten()
        order = torch.argsort(flat, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel())
        return ranks.view(self.shape)

    def tied_ranks(self) -> torch.Tensor:
        """[n_layers, n_heads] 1-based rank of each head as a reader counts it: tied heads share the
        best rank of their group ("1, 2, 2, 4"); unmeasured heads (NaN) get 0."""
        v = self.values
        flat = v.flatten()
        measured = ~torch.isnan(flat)
        out = torch.zeros_like(flat, dtype=torch.long)
        if measured.any():
            vals = flat[measured]
            ascending = vals.sort().values  # heads above v = all − those at or below v: no [n, n] comparison
            out[measured] = 1 + vals.numel() - torch.searchsorted(ascending, vals, right=True)
        return out.view(self.shape)

    def to_mask(self, *, threshold: float | None = None, top_k: int | None = None) -> HeadMask:
        """Heads with score > threshold, or the top_k heads (unmeasured heads never: fewer when
        fewer were measured); weights are the scores."""
        if (threshold is None) == (top_k is None):
            raise HeadlabError("to_mask needs exactly one of threshold=... or top_k=...")
        if top_k is not None:
            if top_k < 0:
                raise HeadlabError(f"top_k must be >= 0, got {top_k}")
            chosen = {(l, h): s for l, h, s in self.top(top_k) if s == s}  # NaN: unmeasured
        else:
            v = self.values
            chosen = {(l, h): float(v[l, h]) for l, h in (v > threshold).nonzero().tolist()}
        return HeadMask(heads=chosen, n_layers=self.shape[0], n_heads=self.shape[1],
                        source={"analysis": self.analysis, "model": self.model, "threshold": threshold, "top_k": top_k})

    # ---- merging -----------------------------------------------------------------------------
    def merge(self, other: "HeadScores") -> "HeadScores":
        """Sum the partial results of two runs of the same analysis on the same model."""
        for attr in ("analysis", "model", "params"):
            if getattr(self, attr) != getattr(other, attr):
                raise HeadlabError(f"cannot merge scores with different {attr}: {getattr(self, attr)!r} vs {getattr(other, attr)!r}")
        if self.shape != other.shape:
            raise HeadlabError(f"cannot merge scores of shapes {self.shape} and {other.shape}")
        return replace(self, sums=self.sums + other.sums, counts=self.counts + other.counts)

    __add__ = merge

    # ---- frames and figures ------------------------------------------------------------------
    def to_frame(self) -> Any:
        """pandas DataFrame: one row per head (layer, head, score, count, rank)."""
        import pandas as pd

        L, H = self.shape
        v, c, r = self.values.flatten(), self.counts.flatten(), self.ranks().flatten()
        return pd.DataFrame({
            "layer": [i // H for i in range(L * H)],
            "head": [i % H for i in range(L * H)],
            "score": v.tolist(),
            "count": c.tolist(),
            "rank": r.tolist(),
        })

    def plot(self, title: str | None = None) -> Any:
        """plotly heatmap, layer (y) × head (x), coloured by the score itself (equal scores, equal
        colours): a diverging scale centred on 0 when the scores take both signs; unmeasured heads
        (no count) left grey and hovered as such; hover shows score, rank (ties share it, 1 = best)
        and count."""
        import plotly.graph_objects as go

        v = self.values
        finite = v[~torch.isnan(v)]
        signed = finite.numel() > 0 and float(finite.min()) < 0 < float(finite.max())
        z = [[None if x != x else x for x in row] for row in v.tolist()]
        r, c = self.tied_ranks().tolist(), self.counts.tolist()
        n = int((~torch.isnan(v)).sum())
        custom = [[[f"{r[l][h]} of {n}" if r[l][h] else "not measured", c[l][h]] for h in range(self.shape[1])]
                  for l in range(self.shape[0])]
        colours = {"colorscale": "RdBu_r", "zmid": 0.0} if signed else {"colorscale": "Viridis"}
        fig = go.Figure(go.Heatmap(
            z=z, x=list(range(self.shape[1])), y=list(range(self.shape[0])), customdata=custom, hoverongaps=True,
            colorbar={"title": {"text": self.analysis}},
            hovertemplate="layer %{y} head %{x}<br>score %{z:.4g}<br>rank %{customdata[0]}<br>count %{customdata[1]}<extra></extra>",
            **colours,
        ))
        if finite.numel() and float(finite.max()) == float(finite.min()):
            title = (title or f"{self.analysis} — {self.model}") + f" (every measured head scores {float(finite.max()):.4g})"
        fig.update_layout(title=title or f"{self.analysis} — {self.model}", xaxis_title="head", yaxis_title="layer",
                          plot_bgcolor="#d9d9d9")
        return fig

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{l}</td><td>{h}</td><td>{s:.4g}</td></tr>" for l, h, s in self.top(10))
        return (
            f"<div><b>HeadScores</b> {html.escape(self.analysis)} on {html.escape(self.model or '?')} "
            f"— {self.shape[0]} layers × {self.shape[1]} heads<table><tr><th>layer</th><th>head</th><th>score</th></tr>{rows}</table></div>"
        )

    def __repr__(self) -> str:
        best = ", ".join(f"L{l}H{h}={s:.3g}" for l, h, s in self.top(3))
        return f"HeadScores({self.analysis!r}, model={self.model!r}, shape={self.shape}, top=[{best}])"

    # ---- disk --------------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {"format": FORMAT, "analysis": self.analysis, "model": self.model, "params": self.params,
                "metadata": self.metadata, "shape": list(self.shape)}

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` (sums, counts + header) and a readable `<path>.json`, atomically."""
        from headlab.io import atomic_save_safetensors, atomic_write_json

        path = Path(path).with_suffix(".safetensors")
        header = self._header()
        header.setdefault("saved", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_save_safetensors({"sums": self.sums, "counts": self.counts}, path, metadata={"headlab": json.dumps(header, default=str)})
        atomic_write_json({**header, "values": self.values.tolist(), "counts": self.counts.tolist()}, path.with_suffix(".json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        """Scores saved by `save` (the .safetensors; a sibling path's suffix is replaced). Anything
        else is an InputFileError naming the file and the problem."""
        from headlab.io import open_safetensors, parse, safetensors_header

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        what = "a headlab scores file (HeadScores.save)"
        with open_safetensors(path, what) as f:
            header = safetensors_header(f, path, what)
            if not header:
                raise InputFileError(f"{path} is not a headlab scores file (no 'headlab' header)")
            if header.get("format") != FORMAT:
                raise InputFileError(f"{path}: unsupported scores format {header.get('format')!r} (expected {FORMAT})")
            missing = [k for k in ("sums", "counts") if k not in f.keys()]
            if missing:
                raise InputFileError(f"{path}: not {what}: no {' or '.join(missing)} tensor")
            sums, counts = f.get_tensor("sums"), f.get_tensor("counts")
        with parse(path, what):
            if not (sums.is_floating_point() and counts.is_floating_point()):
                raise ValueError(f"sums and counts must be float tensors, got {sums.dtype} and {counts.dtype}")
            if not isinstance(header.get("analysis"), str):
                raise ValueError("its header names no analysis")
            params, metadata = header.get("params", {}), header.get("metadata", {})
            return cls(sums=sums.to(torch.float64), counts=counts.to(torch.float64), analysis=header["analysis"],
                       model=str(header.get("model", "")), params=params if isinstance(params, dict) else {},
                       metadata=metadata if isinstance(metadata, dict) else {})


def merge_all(parts: list[HeadScores]) -> HeadScores:
    """Merge many partial HeadScores (e.g. one per shard)."""
    if not parts:
        raise HeadlabError("nothing to merge")
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    return total

