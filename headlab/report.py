"""Tables read off run summaries: what an intervention changed, against the random-head control.

Used by the app's run page and by study reports (`headlab.study`), so both show the same numbers.
"""

from __future__ import annotations

import math
from typing import Any


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _mean(xs: Any) -> float | None:
    vals = [v for v in (_num(x) for x in xs) if v is not None] if isinstance(xs, list) else []
    return sum(vals) / len(vals) if vals else None


def before_after(summary: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Rows (metric, before, after, change, random heads) found in a run summary: sibling keys
    `X_before` / `X_after` (and `X_random`, a list: its mean), or sibling objects `before` / `after`
    (and `random`, a list of such objects; nested objects give dotted metric names), at any depth.
    Numbers only (sample counts `n` left out); rounded to 4 places."""
    rows: list[dict[str, Any]] = []
    if not isinstance(summary, dict):
        return rows

    def row(name: str, b: Any, a: Any, r: Any = None) -> None:
        b, a = _num(b), _num(a)
        if b is not None and a is not None and name.rsplit(".", 1)[-1] != "n":  # a sample count, not a metric
            rows.append({"metric": name, "before": round(b, 4), "after": round(a, 4), "change": round(a - b, 4),
                         "random heads": None if r is None else round(r, 4)})

    def pair(name: str, b: dict, a: dict, randoms: list) -> None:
        for metric, bv in b.items():
            rs = [x.get(metric) for x in randoms if isinstance(x, dict)]
            if isinstance(bv, dict) and isinstance(a.get(metric), dict):
                pair(f"{name}{metric}.", bv, a[metric], rs)
            else:
                row(name + metric, bv, a.get(metric), _mean(rs) if rs else None)

    for key, value in summary.items():
        if isinstance(key, str) and key.endswith("_before") and key[:-7] + "_after" in summary:
            base = key[:-7]
            row(prefix + base, value, summary[base + "_after"], _mean(summary.get(base + "_random")))
    if isinstance(summary.get("before"), dict) and isinstance(summary.get("after"), dict):
        randoms = summary.get("random") if isinstance(summary.get("random"), list) else []
        pair(prefix, summary["before"], summary["after"], randoms)
    for key, value in summary.items():
        if isinstance(value, dict) and key not in ("before", "after"):
            rows += before_after(value, f"{prefix}{key}.")
    return rows


def top_heads(scores: Any, k: int = 5) -> str:
    """"L5H4 0.35, L5H5 0.28, ..." for the k best measured heads of a HeadScores."""
    return ", ".join(f"L{l}H{h} {s:.3g}" for l, h, s in scores.top(k) if not math.isnan(s)) or "(none measured)"


__all__ = ["before_after", "top_heads"]
