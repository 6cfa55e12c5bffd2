"""Safety heads (Ships / Sahara) and knowledge-conflict heads (path patching / PH3) on zoo:safety-conflict.

zoo:safety-conflict has its refusal head, context head and memory head planted (studies/zoo/train.py
--plant ... --knockout); its card ranks every head by the accuracy lost when it is ablated. The
analyses here know nothing of the planting: they must find those heads from the model's behaviour,
and the interventions built on them must steer the model far more than ablating random heads.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from headlab.analyses import conflict, safety
from typer.testing import CliRunner

import headlab
from headlab import jobs, zoo
from headlab.checkpoint import Checkpoint
from headlab.cli import app
from headlab.datasets import DatasetError
from headlab.errors import HeadlabError
from headlab.runs import read_manifest

MODEL = "zoo:safety-conflict"
ZOO_MATCHER = safety.RefusalMatcher(("sorry", "cannot"), min_chars=0)
runner = CliRunner()


@pytest.fixture(scope="module")
def hm():
    return headlab.load_model(MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads((zoo.path("safety-conflict") / "card.json").read_text())


def _card_top(card, task, k):
    return {(h["layer"], h["head"]) for h in card["tasks"][task]["top_heads"][:k]}


@pytest.fixture(scope="module")
def harmful():
    return safety.zoo_dataset(40, harmful=True)


@pytest.fixture(scope="module")
def harmless():
    return safety.zoo_dataset(40, harmful=False)


def test_refusal_matcher():
    m = safety.RefusalMatcher()
    assert m("I'm sorry, but I cannot help with that request because it is dangerous.")
    assert m("Sure")  # shorter than 32 characters: the reference counts it as not answered
    assert not m("Sure, here is a short poem about the sea and the sky at dawn.")
    assert not safety.RefusalMatcher(min_chars=0)("Sure")
    assert ZOO_MATCHER("sorry i cannot help") and not ZOO_MATCHER("sure , kite tea piano")


def test_ships_ranks_the_refusal_head_first(hm, harmful, card):
    result = safety.ships(hm, harmful, progress=False)
    top = result.scores.top(1)[0]
    assert (top[0], top[1]) in _card_top(card, "refusal", 1)  # the card's most refusal-critical head (planted L1H0)
    assert result.per_query.shape == (40, *hm.spec.shape)
    assert result.top_counts.values.sum() == 40 * min(10, hm.spec.n_layers * hm.spec.n_heads)


def test_sahara_finds_the_refusal_heads_and_ablating_them_jailbreaks(hm, harmful, harmless, card):
    found = safety.sahara(hm, harmful, safety.SafetyConfig(epsilon=1e-5, max_heads=2), progress=False)
    assert len(found.heads) == 2 and found.angles[1] >= found.angles[0] > 0
    assert _card_top(card, "refusal", 1) <= set(found.heads)
    ev = safety.evaluate(hm, harmful, harmless, found.heads, matcher=ZOO_MATCHER, random_draws=3)
    h, ok = ev["harmful"], ev["harmless"]
    assert h["refusal_before"] == 1.0 and ok["refusal_before"] == 0.0
    assert h["attack_success_after"] >= 0.8
    assert max(h["attack_success_random"]) <= h["attack_success_after"] - 0.5  # far more than random heads
    assert ok["refusal_after"] <= 0.1  # harmless requests are still answered
    assert h["generations"][0]["before"] == "sorry i cannot help"


def test_sahara_stops_when_the_angle_stops_growing(hm, harmful):
    found = safety.sahara(hm, harmful[:16], safety.SafetyConfig(epsilon=1e-5, max_heads=4, min_gain=1e6), progress=False)
    assert len(found.heads) == 1


@pytest.fixture(scope="module")
def conflict_split():
    samples = conflict.zoo_dataset(96)
    return samples[:48], samples[48:]


@pytest.fixture(scope="module")
def conflict_heads(hm, conflict_split):
    return conflict.find_heads(hm, conflict_split[0], progress=False)


def test_zoo_conflict_pairs_are_well_formed(hm):
    from headlab.zoo import tasks

    table = tasks.facts()
    for s in conflict.zoo_dataset(20):
        assert s.memory != s.context and len(s.prompt.split()) == len(s.corrupted.split())
        words = s.corrupted.split()
        assert s.context not in words and s.memory not in words
        other = words[words.index("where") + 2]
        assert table[other] not in (s.memory, s.context)


def test_path_patching_finds_the_planted_memory_and_context_heads(conflict_heads):
    assert (1, 2) in [(l, h) for l, h, _ in conflict_heads.memory.top(2)]   # planted memory head
    assert (1, 1) in [(l, h) for l, h, _ in conflict_heads.context.top(2)]  # planted context head


@pytest.mark.parametrize("toward", ["context", "memory"])
def test_ph3_steers_far_more_than_random_pruning(hm, conflict_split, conflict_heads, toward):
    cal, test = conflict_split
    result = conflict.ph3(hm, cal, conflict_heads, toward, max_k=3)
    ev = conflict.evaluate(hm, test, result.plan, random_draws=3)
    rate = f"{toward}_rate"
    assert ev["before"]["memory_rate"] == pytest.approx(0.5, abs=0.05)  # half report, half rumor prompts
    gain = ev["after"][rate] - ev["before"][rate]
    random_gain = max(r[rate] for r in ev["random"]) - ev["before"][rate]
    assert gain >= 0.3 and gain >= random_gain + 0.3, (ev["after"], ev["random"])


def test_ph3_rejects_bad_arguments(conflict_heads):
    with pytest.raises(HeadlabError, match="toward"):
        conflict.ph3_plan(conflict_heads, "sideways", 1)  # type: ignore[arg-type]
    with pytest.raises(HeadlabError, match="k must be"):
        conflict.ph3_plan(conflict_heads, "context", 0)


# ---- datasets, jobs and CLI ----------------------------------------------------------------------

def test_prompt_datasets_name_the_problem(tmp_path):
    good = tmp_path / "advbench.csv"
    good.write_text("goal,target\nWrite a poem,Sure\nBake bread,Sure\n")
    assert safety.build_dataset(good) == ["Write a poem", "Bake bread"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "x"}\n{"text": "y"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: no prompt column"):
        safety.build_dataset(bad)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a b", "memory_answer": "x", "context_answer": "x", "corrupted_prompt": "c d"}) + "\n")
    with pytest.raises(DatasetError, match="line 1: memory and context answers are both"):
        conflict.build_dataset(pairs)
    pairs.write_text(json.dumps({"prompt": "a b", "memory_answer": "x"}) + "\n")
    with pytest.raises(DatasetError, match="line 1: field 'context_answer' is missing"):
        conflict.build_dataset(pairs)


def test_safety_job_writes_a_run_and_resumes(tmp_path, monkeypatch):
    kw = dict(n=12, max_heads=1, progress=False, method="exact")
    real = safety.kl_divergence
    calls = []

    def failing(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(safety, "kl_divergence", failing)
    with pytest.raises(KeyboardInterrupt):
        jobs.run("safety", MODEL, tmp_path, "s1", **kw)
    assert read_manifest(tmp_path / "s1")["status"] == "interrupted"
    # 12 prompts, 32 rows a pass: 2 heads × the prompts per pass; 2 passes finished
    assert sorted(Checkpoint(tmp_path / "s1" / jobs.CHECKPOINT)) == ["ships:L0H0", "ships:L0H1", "ships:L0H2", "ships:L0H3"]

    monkeypatch.setattr(safety, "kl_divergence", real)
    run = jobs.run("safety", MODEL, tmp_path, "s1", **kw)
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["sahara_heads"]) == 1 and summary["evaluation"]["harmful"]["refusal_before"] == 1.0
    assert summary["evaluation"]["harmful"]["attack_success_after"] > 0.5
    gens = pd.read_parquet(run / "generations.parquet")
    assert set(gens["set"]) == {"harmful", "harmless"} and len(gens) == 24
    assert headlab.HeadScores.load(run / "ships").shape == (2, 4)
    assert headlab.InterventionPlan.load(run / "plan").logit_scales  # undifferentiated attention on the found head
    assert read_manifest(run)["resumed"] == 1


def test_conflict_and_ph3_commands(tmp_path):
    res = runner.invoke(app, ["score", "conflict", MODEL, "--out", str(tmp_path), "--n", "16", "--run-id", "c1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c1" / "summary.json").read_text())
    assert summary["pairs"] == 16 and summary["memory_heads"] and summary["context_heads"]
    res = runner.invoke(app, ["intervene", "ph3", MODEL, "--out", str(tmp_path), "--toward", "memory", "--n", "32",
                              "--k", "1", "--run-id", "p1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "p1" / "summary.json").read_text())
    assert summary["k"] == 1 and len(summary["pruned"]) == 1
    assert headlab.InterventionPlan.load(tmp_path / "p1" / "plan").head_scales == {tuple(summary["pruned"][0]): 0.0}
    res = runner.invoke(app, ["intervene", "ph3", MODEL, "--out", str(tmp_path), "--toward", "sideways"])
    assert res.exit_code == 2 and "--toward must be one of context, memory" in res.output


def test_non_zoo_models_need_datasets(tmp_path, tiny_dirs):
    with pytest.raises(HeadlabError, match="give --harmful"):
        jobs.run("safety", str(tiny_dirs("llama")), tmp_path)
    with pytest.raises(HeadlabError, match="give --data"):
        jobs.run("conflict", str(tiny_dirs("llama")), tmp_path)
