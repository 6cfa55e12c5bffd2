"""Retrieval heads on the zoo model: definition, both variants, and the paper's causal test."""

from __future__ import annotations

import json

import pytest
import torch

import headlab
from headlab import zoo
from headlab.analyses import retrieval
from headlab.errors import HeadlabError


@pytest.fixture(scope="module")
def model():
    return headlab.load_model("zoo:tasks-llama")


@pytest.fixture(scope="module")
def result(model):
    samples = retrieval.zoo_dataset(lengths=(64, 256), depths=(0.0, 0.5, 1.0), per_cell=2, seed=1)
    return samples, retrieval.score(model, samples, progress=False)


def test_locate_needle_uses_the_overlap_rule():
    prompt = [5, 6, 1, 2, 3, 4, 9, 1, 2]
    assert retrieval.locate_needle(prompt, [1, 2, 3, 4]) == (2, 6)
    with pytest.raises(HeadlabError, match="does not occur"):
        retrieval.locate_needle(prompt, [1, 2, 7, 8])


def test_score_counts_copies_from_the_needle(model, result):
    samples, res = result
    assert res.samples.correct.all()  # the zoo model retrieves every needle
    # Recompute one sample by hand from the raw decode-step argmax stats.
    sample = samples[0]
    tok = model.tokenizer
    prompt_ids = tok(sample.prompt)["input_ids"]
    s, e = retrieval.locate_needle(prompt_ids, tok(sample.needle, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([prompt_ids])
    with model.patched(None, headlab.StatsRequest(argmax=True, queries=slice(-1, None))) as rec:
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    expected = torch.zeros(model.spec.shape, dtype=torch.float64)
    for t, w in enumerate(out[0, len(prompt_ids):].tolist()):
        for l in range(model.spec.n_layers):
            for h in range(model.spec.n_heads):
                j = int(rec.stats.argmax[l, 0, h, t])
                if s <= j < e and prompt_ids[j] == w:
                    expected[l, h] += 1 / (e - s)
    got, _ = retrieval.sample_scores(model, sample, retrieval.RetrievalConfig())
    torch.testing.assert_close(got, expected)


def test_teacher_forced_agrees_with_decoding(model, result):
    samples, res = result
    forced = retrieval.score(model, samples, retrieval.RetrievalConfig(teacher_forced=True), progress=False)
    torch.testing.assert_close(forced.scores.values, res.scores.values)


def test_top_retrieval_head_is_the_cards_needle_head_and_masking_breaks_retrieval(model, result):
    _, res = result
    card = json.loads((zoo.path("tasks-llama") / "card.json").read_text())["tasks"]["needle"]
    critical = (card["top_heads"][0]["layer"], card["top_heads"][0]["head"])
    assert (res.scores.top(1)[0][0], res.scores.top(1)[0][1]) == critical
    heads = res.retrieval_heads()
    assert critical in heads and len(heads) <= 0.1 * res.scores.values.numel()  # sparse
    test = retrieval.zoo_dataset(lengths=(128,), depths=(0.2, 0.8), per_cell=5, seed=2)
    effect = retrieval.masking_test(model, test, res.scores, k=3, draws=2)
    assert effect["baseline"] == 1.0
    assert effect["top_pruned"] <= 0.2
    assert min(effect["random_pruned"]) >= 0.8
