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


@pytest.fixture(scope="module")
def whole(model, result):
    """The same samples scored over the whole needle sentence (span="needle")."""
    return retrieval.score(model, result[0], retrieval.RetrievalConfig(span="needle"), progress=False)


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
    needle = retrieval.locate_needle(prompt_ids, tok(sample.needle, add_special_tokens=False)["input_ids"])
    s, e = retrieval.answer_span(tok, sample.prompt, prompt_ids, needle, sample.answer)  # the reference's real_needle span
    assert needle[0] <= s < e <= needle[1] and e - s == len(sample.answer.split())
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


def test_top_retrieval_head_is_the_cards_needle_head_and_masking_breaks_retrieval(model, result, whole):
    _, res = result
    card = json.loads((zoo.path("tasks-llama") / "card.json").read_text())["tasks"]["needle"]
    critical = (card["top_heads"][0]["layer"], card["top_heads"][0]["head"])
    assert (res.scores.top(1)[0][0], res.scores.top(1)[0][1]) == critical
    # Sparse at the paper's 0.1 over the needle sentence. Over the reference's answer span the same
    # copies weigh 4x more here (2-token answers: one copy = 0.5), so 0.1 is loose on this toy task.
    heads = whole.retrieval_heads()
    assert critical in heads and len(heads) <= 0.1 * res.scores.values.numel()
    test = retrieval.zoo_dataset(lengths=(128,), depths=(0.2, 0.8), per_cell=5, seed=2)
    effect = retrieval.masking_test(model, test, res.scores, k=3, draws=2)
    assert effect["baseline"] == 1.0
    assert effect["top_pruned"] <= 0.2
    assert min(effect["random_pruned"]) >= 0.8


def test_answer_recall_is_rouge1_recall_with_stemming():
    assert retrieval.answer_recall("eat a sandwich and sit in Dolores Park", "eat sandwiches and sit in the park") == 6 / 8
    assert retrieval.answer_recall("v1 v2", "v1 v2") == 1.0
    assert retrieval.answer_recall("v1 v2", "v1") == 0.5  # not more than half: rejected by the reference's rule


def test_only_retrieved_samples_count_as_the_reference_counts_them(model):
    """Half of the samples decode with the card's needle heads pruned, so the model fails them: the
    reference's rule averages the other half only; accept="all" lets the failures dilute the score."""
    samples = retrieval.zoo_dataset(lengths=(64, 128), depths=(0.0, 0.5, 1.0), per_cell=1, seed=3)
    card = json.loads((zoo.path("tasks-llama") / "card.json").read_text())["tasks"]["needle"]
    cut = headlab.InterventionPlan().prune_heads([(t["layer"], t["head"]) for t in card["top_heads"][:3]])
    plans = [cut if i % 2 else None for i in range(len(samples))]
    ref = retrieval.score(model, samples, progress=False, plans=plans)
    every = retrieval.score(model, samples, retrieval.RetrievalConfig(accept="all"), progress=False, plans=plans)
    retrieved = (ref.samples["recall"] > 0.5).tolist()
    kept = [i for i, ok in enumerate(retrieved) if ok]
    assert all(retrieved[0::2]) and retrieved.count(False) >= 2  # the pruned half fails (at least partly)
    assert ref.accepted == kept and ref.scores.metadata["accepted"] == kept
    assert torch.all(ref.scores.counts == len(kept)) and torch.all(every.scores.counts == len(samples))
    torch.testing.assert_close(ref.scores.values, ref.per_sample[kept].mean(0))
    torch.testing.assert_close(every.scores.values, every.per_sample.mean(0))
    torch.testing.assert_close(ref.per_sample, every.per_sample)  # same decodes; only the average differs
    layer, head, best = ref.scores.top(1)[0]
    assert every.scores[(layer, head)] < best - 0.05  # failed retrievals dilute the all-samples mean


def test_whole_needle_span_is_a_named_option(result, whole):
    samples, res = result
    first = whole.samples.iloc[0]
    assert first.needle_end - first.needle_start == len(samples[0].needle.split())
    # the copies are the same; the needle is longer than the answer, so each copy counts less
    ratio = (res.per_sample.sum() / whole.per_sample.sum()).item()
    assert ratio == pytest.approx(len(samples[0].needle.split()) / len(samples[0].answer.split()), rel=1e-6)
