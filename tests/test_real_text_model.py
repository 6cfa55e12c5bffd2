"""zoo:pycode-llama, the model trained on real Python source: its card matches its weights, and the
heads the card names are causal — ablating the top induction / retrieval heads costs at least half
of what the card records, while the card's random heads cost near zero."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from headlab.analyses import code_tasks, patterns, retrieval

import headlab
from headlab import InterventionPlan, zoo

CARD = json.loads((zoo.path("pycode-llama") / "card.json").read_text())


@pytest.fixture(scope="module")
def model():
    return headlab.load_model("zoo:pycode-llama")


def heads(rows) -> list[tuple[int, int]]:
    return [(int(l), int(h)) for l, h in rows]


def test_the_model_beats_a_bigram_by_a_wide_margin():
    training = json.loads((zoo.path("pycode-llama") / "training.json").read_text())
    assert training["validation"]["perplexity"] < training["bigram_baseline"]["perplexity"] / 10
    assert training["corpus"]["train_tokens"] >= 50_000_000  # the probe's bar for generalizing, not memorizing
    assert CARD["training"]["validation_perplexity"] == round(training["validation"]["perplexity"], 3)


def test_card_patterns_and_retrieval_come_from_these_weights(model):
    rnd = patterns.score(model, patterns.repeated_random_tokens(model, n=16, length=128, seed=CARD["seed"]),
                         progress=False)
    for kind in patterns.KINDS:
        torch.testing.assert_close(rnd.scores[kind].values, torch.tensor(CARD["patterns"]["random"][kind], dtype=torch.float64),
                                   atol=2e-4, rtol=0)
    top = [(l, h) for l, h, _ in rnd.scores["induction"].top(CARD["k"])]
    assert top == heads(CARD["ablations"]["induction"]["top_heads"])


def _costs(metric, card_entry, sign: float) -> tuple[float, float, list[float]]:
    """(card cost of the top heads, measured cost of the top heads, measured costs of the card's random draws)."""
    base = metric(None)
    top = metric(InterventionPlan().prune_heads(heads(card_entry["top_heads"])))
    rand = [metric(InterventionPlan().prune_heads(heads(d))) for d in card_entry["random_heads"]]
    card_cost = sign * (card_entry["top_zero"] - card_entry["baseline"])
    return card_cost, sign * (top - base), [sign * (r - base) for r in rand]


def test_ablating_the_cards_induction_heads_breaks_copying(model):
    entry = CARD["ablations"]["induction"]
    inputs = patterns.repeated_random_tokens(model, n=8, length=128, seed=CARD["seed"] + 2)  # fresh blocks
    card_cost, cost, random_costs = _costs(lambda plan: patterns.second_copy_loss(model, inputs, plan), entry, +1.0)
    assert card_cost > 4.0  # the card records a large loss increase (nats on the second copy)
    assert cost >= 0.5 * card_cost
    assert statistics.median(random_costs) <= 0.1 * cost  # as many random heads: near zero
    assert max(random_costs) < 0.5 * cost


def test_ablating_the_cards_retrieval_heads_breaks_needle_retrieval(model):
    entry = CARD["ablations"]["retrieval"]
    needles = code_tasks.needle_samples(model.tokenizer, (128, 256, 512), per_cell=1, seed=CARD["seed"] + 2)  # fresh needles
    card_cost, cost, random_costs = _costs(lambda plan: retrieval.needle_accuracy(model, needles, plan), entry, -1.0)
    assert card_cost > 0.4
    assert cost >= 0.5 * card_cost
    assert statistics.median(random_costs) <= 0.15 * cost


def test_retrieval_and_induction_heads_coincide():
    """What emerged: the copy heads that retrieve the needle are the induction heads (layer 5)."""
    induction = set(heads(CARD["ablations"]["induction"]["top_heads"]))
    retrieval_top = set(heads(CARD["ablations"]["retrieval"]["top_heads"]))
    assert len(induction & retrieval_top) >= 2
