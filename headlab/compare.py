"""Comparing HeadScores of several analyses on one model: top-k overlap and rank correlation.

    from headlab.compare import compare, jaccard_topk, spearman
    jaccard_topk(retrieval, sinks, k=10)      # |top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|
    spearman(retrieval, sinks)                # rank correlation over the heads both scored
    compare([retrieval, sinks, select_copy], k=10)   # pairwise table (a pandas DataFrame)

Heads a score left unmeasured (NaN) are left out of the rank correlation, and never enter a
top-k set. Heads tied with the k-th best all enter its top-k set (so the set may hold more than k:
order among equal scores means nothing); a score that is the same for every measured head ranks
nothing, and comparisons with it are NaN. Scores of models of different shapes cannot be compared
(a HeadlabError says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch

from headlab.errors import HeadlabError
from headlab.scores import HeadScores


def _check_pair(a: HeadScores, b: HeadScores) -> None:
    if a.shape != b.shape:
        raise HeadlabError(f"cannot compare {a.analysis!r} {a.shape} with {b.analysis!r} {b.shape}: "
                           "scores of models with different numbers of layers / heads")


def top_set(scores: HeadScores, k: int) -> set[tuple[int, int]]:
    """The k best measured heads as (layer, head) pairs, with every head tied with the k-th
    (fewer when fewer were measured)."""
    if k < 1:
        raise HeadlabError(f"k must be >= 1, got {k}")
    best = [value for _, _, value in scores.top(k) if not math.isnan(value)]
    if not best:
        return set()
    v = scores.values
    return {(int(l), int(h)) for l, h in (v >= best[-1]).nonzero().tolist()}


def is_constant(scores: HeadScores) -> bool:
    """True when every measured head has the same score (nothing to rank)."""
    v = scores.values[~torch.isnan(scores.values)]
    return v.numel() > 0 and bool((v == v[0]).all())


def jaccard_topk(a: HeadScores, b: HeadScores, k: int = 10) -> float:
    """Jaccard index of the two top-k head sets, in [0, 1] (NaN when neither measured a head, or
    when either score is constant: its top-k would be an arbitrary pick)."""
    _check_pair(a, b)
    if is_constant(a) or is_constant(b):
        return float("nan")
    sa, sb = top_set(a, k), top_set(b, k)
    union = sa | sb
    return len(sa & sb) / len(union) if union else float("nan")


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their mean rank (as Spearman's ρ needs)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: HeadScores, b: HeadScores) -> float:
    """Spearman's rank correlation of the two scores over the heads both measured (NaN if < 3
    such heads, or if either is constant on them)."""
    _check_pair(a, b)
    va, vb = a.values.flatten(), b.values.flatten()
    both = ~(torch.isnan(va) | torch.isnan(vb))
    if int(both.sum()) < 3:
        return float("nan")
    ra, rb = _average_ranks(va[both]), _average_ranks(vb[both])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def compare(scores: Sequence[HeadScores], k: int = 10, names: Sequence[str] | None = None):
    """Pairwise comparison table: one row per pair (a, b) with `jaccard_topk`, `spearman` and the
    number of shared top-k heads. `names` default to each score's analysis name."""
    import pandas as pd

    if len(scores) < 2:
        raise HeadlabError("compare needs at least two HeadScores")
    names = list(names) if names is not None else [s.analysis for s in scores]
    if len(names) != len(scores):
        raise HeadlabError(f"{len(names)} names for {len(scores)} scores")
    rows = []
    for i, j in combinations(range(len(scores)), 2):
        a, b = scores[i], scores[j]
        constant = [n for n, s in ((names[i], a), (names[j], b)) if is_constant(s)]
        rows.append({"a": names[i], "b": names[j], "k": k, "jaccard_topk": jaccard_topk(a, b, k),
                     "shared_topk": None if constant else len(top_set(a, k) & top_set(b, k)), "spearman": spearman(a, b),
                     "note": f"{' and '.join(constant)} is the same for every head: nothing to rank" if constant else ""})
    return pd.DataFrame(rows)


__all__ = ["compare", "is_constant", "jaccard_topk", "spearman", "top_set"]
