"""ZeroTuning's and ACT's head searches recover planted miscalibrations of zoo:mcqa-planted.

The zoo models answer their closed-choice tasks perfectly, so there is nothing for a calibration
to improve on them as trained. Each test plants a known fault with an InterventionPlan (first-token
attention scaled up on one layer's heads; a hidden sink made by a key bias on a mid-prompt token)
and checks that the search finds the faulty heads and restores held-out accuracy.
"""

from __future__ import annotations

import pytest
from headlab.analyses import act, choice
from headlab.analyses import zerotuning as zt

import headlab
from headlab.errors import HeadlabError

P = headlab.InterventionPlan
L1 = [(1, h) for h in range(4)]
L2 = [(2, h) for h in range(4)]


@pytest.fixture(scope="module")
def model():
    return headlab.load_model("zoo:mcqa-planted")


@pytest.fixture(scope="module")
def calib():
    return choice.zoo_dataset("mcqa", 60, seed=30_000)


@pytest.fixture(scope="module")
def test_set():
    return choice.zoo_dataset("mcqa", 120, seed=31_000)


def test_choice_accuracy_reads_the_label_logits(model, test_set):
    ev = choice.evaluate(model, test_set)
    assert ev.accuracy >= 0.95 and ev.entropy < 0.05
    # a layer-wide fault collapses the prediction to chance (4 options)
    assert choice.accuracy(model, test_set, P().scale_first_token({h: 1000.0 for h in L1})) < 0.4


@pytest.mark.parametrize("objective", ["accuracy", "entropy"])
def test_zerotuning_finds_the_miscalibrated_layer_and_restores_accuracy(model, calib, test_set, objective):
    fault = P().scale_first_token({h: 300.0 for h in L1})
    r = zt.calibrate(model, calib, zt.ZeroTuningConfig(objective=objective), base_plan=fault, progress=False)
    assert r.direction == "down" and r.gamma < 0.5
    assert len(set(L1) & set(r.heads)) >= 3  # unsupervised (entropy) may miss a head or add others
    if objective == "accuracy":
        assert set(r.heads) == set(L1)  # supervised: exactly the faulty heads
        assert r.calibrated > r.baseline
    out = zt.evaluate(model, test_set, r.plan, base_plan=fault)
    assert out["accuracy_before"] < 0.6 and out["accuracy_after"] >= 0.95
    # the profile gains are what they claim: one head's γ_down alone, against the faulty model
    head = r.profile_down.top(1)[0][:2]
    gain = choice.accuracy(model, calib, fault + P().scale_first_token({head: 0.5})) - choice.accuracy(model, calib, fault)
    if objective == "accuracy":
        assert r.profile_down[head] == pytest.approx(gain)


def test_zerotuning_is_the_identity_when_nothing_helps(model, calib):
    r = zt.calibrate(model, calib, zt.ZeroTuningConfig(layers=[2]), progress=False)
    assert r.direction == "none" and r.heads == [] and r.plan.is_empty()


def test_zerotuning_config_errors():
    with pytest.raises(HeadlabError, match="gamma_up > 1"):
        zt.ZeroTuningConfig(gamma_up=0.5)
    with pytest.raises(HeadlabError, match="objective"):
        zt.ZeroTuningConfig(objective="loss")


def test_act_search_keeps_the_heads_with_a_planted_hidden_sink(model, calib, test_set):
    sink = P().key_bias({h: 6.0 for h in L1 + L2}, 6)  # token 6 ("?") becomes a sink in layers 1-2
    r = act.search(model, calib, base_plan=sink, progress=False)
    assert r.heads and all(l in (1, 2) for l, _ in r.heads)
    assert r.calibrated_accuracy > r.baseline_accuracy
    # kept = exactly the searched heads whose accuracy alone beats the baseline
    assert r.heads == [h for h in r.searched if r.gains[h] > 0]
    one = r.heads[0]
    alone = choice.accuracy(model, calib, sink + P().act([one], beta=0.4, tau=0.1)) - r.baseline_accuracy
    assert r.gains[one] == pytest.approx(alone)
    out = act.evaluate(model, test_set, r.plan, base_plan=sink)
    assert out["accuracy_after"] >= out["accuracy_before"] + 0.2


def test_act_candidate_layers_follow_the_reference():
    assert act.ACTConfig().candidate_layers(32) == list(range(2, 31))  # layers 2..30 of 32
    assert act.ACTConfig().candidate_layers(3) == [0, 1, 2]
    assert act.ACTConfig(layers=[1]).candidate_layers(32) == [1]


def test_choice_dataset_errors(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("prompt,choices,answer\nis it good ?,yes | no,no\nis it bad ?,yes | no,maybe\n")
    with pytest.raises(HeadlabError, match=r"c.csv, line 3: 'answer' 'maybe' is neither"):
        choice.build_dataset(f)
    f.write_text("prompt,choices,answer\nis it good ?,yes | no,1,extra\n")
    with pytest.raises(HeadlabError, match=r"line 2: more values than the 3 header columns"):
        choice.build_dataset(f)
    f.write_text("prompt,choices,answer\nis it good ?,yes | no,1\n")
    assert choice.build_dataset(f)[0].choices == ("yes", "no")
    (tmp_path / "c.txt").write_text("is it good ?\n")
    with pytest.raises(HeadlabError, match="unknown dataset format '.txt'"):
        choice.build_dataset(tmp_path / "c.txt")
    with pytest.raises(HeadlabError, match="no such file"):
        choice.build_dataset(tmp_path / "missing.jsonl")
