"""headlab.compare: top-k Jaccard and Spearman rank correlation between HeadScores."""

from __future__ import annotations

import pytest
import torch

from headlab.compare import compare, jaccard_topk, spearman, top_set
from headlab.errors import HeadlabError
from headlab.scores import HeadScores


def scores(values, name="a"):
    return HeadScores.from_tensor(torch.as_tensor(values, dtype=torch.float64), name)


def test_jaccard_of_top_sets():
    a = scores([[0.9, 0.1], [0.8, 0.2]])
    b = scores([[0.7, 0.6], [0.1, 0.0]])
    assert top_set(a, 2) == {(0, 0), (1, 0)} and top_set(b, 2) == {(0, 0), (0, 1)}
    assert jaccard_topk(a, b, 2) == pytest.approx(1 / 3)
    assert jaccard_topk(a, a, 3) == 1.0


def test_unmeasured_heads_never_enter_top_sets_or_correlations():
    a = scores([[float("nan"), 0.1], [0.8, 0.2]])
    assert top_set(a, 4) == {(0, 1), (1, 0), (1, 1)}
    b = scores([[5.0, 1.0], [3.0, 2.0]])
    assert spearman(a, b) == pytest.approx(1.0)  # on the 3 heads both measured, same order


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (4, 6), generator=g).double()  # many ties
    y = x + torch.randn(4, 6, generator=g, dtype=torch.float64)
    expected = stats.spearmanr(x.flatten().numpy(), y.flatten().numpy()).statistic
    assert spearman(scores(x), scores(y)) == pytest.approx(expected, abs=1e-12)
    assert spearman(scores(x), scores(-x)) == pytest.approx(-1.0)


def test_compare_table_and_errors():
    a, b, c = scores([[1.0, 2.0], [3.0, 4.0]], "retrieval"), scores([[4.0, 3.0], [2.0, 1.0]], "sinks"), \
        scores([[1.0, 2.0], [3.0, 5.0]], "select_copy")
    table = compare([a, b, c], k=2)
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [
        ("retrieval", "sinks"), ("retrieval", "select_copy"), ("sinks", "select_copy")]
    assert table.loc[0, "spearman"] == pytest.approx(-1.0) and table.loc[1, "jaccard_topk"] == 1.0
    assert table.loc[0, "shared_topk"] == 0
    with pytest.raises(HeadlabError, match="different numbers of layers"):
        jaccard_topk(a, scores([[1.0, 2.0, 3.0]]))
    with pytest.raises(HeadlabError, match="at least two"):
        compare([a])
    with pytest.raises(HeadlabError, match="k must be >= 1"):
        top_set(a, 0)
