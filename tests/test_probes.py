"""Probes on head outputs (ITI) and the shift intervention: exact in the reference (and, through
tests/test_triton_kernel.py, in the Triton path), the planted refusal head found by its probe, and
steering along it changes behaviour where random heads do not."""

from __future__ import annotations

import random

import pytest
import torch

import headlab
from headlab import HeadMask, InterventionPlan, StatsRequest
from headlab.analyses import probes, safety
from headlab.errors import HeadlabError, PlanError
from headlab.runs import RunStore

REFUSAL_HEAD = (1, 0)  # planted in zoo:safety-conflict (its card)


def test_shift_adds_the_vector_to_the_head_output(llama_dir):
    model = headlab.load_model(llama_dir)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    v = torch.randn(model.spec.head_dim, generator=torch.Generator().manual_seed(1))
    request = StatsRequest(head_outputs=True, layers=[1])
    with model.patched(None, request) as base:
        model(ids)
    with model.patched(InterventionPlan().shift_heads({(1, 2): v}), request) as shifted:
        model(ids)
    z0, z1 = base.stats.head_outputs[0], shifted.stats.head_outputs[0]  # [B, H, Q, Dv]
    torch.testing.assert_close(z1[:, 2], z0[:, 2] + v, atol=1e-5, rtol=1e-5)
    others = [h for h in range(model.spec.n_heads) if h != 2]
    torch.testing.assert_close(z1[:, others], z0[:, others])


def test_shift_plans_serialize_combine_and_come_from_masks(tmp_path, llama_dir):
    spec = headlab.load_model(llama_dir).spec
    v = torch.arange(spec.head_dim, dtype=torch.float32)
    plan = InterventionPlan().shift_heads({(0, 1): v}) + InterventionPlan().shift_heads({(0, 1): v})
    torch.testing.assert_close(plan.shifts[(0, 1)], 2 * v)  # shifts add up
    loaded = InterventionPlan.load(plan.save(tmp_path / "plan"))
    torch.testing.assert_close(loaded.shifts[(0, 1)], 2 * v)
    directions = torch.zeros(spec.n_layers, spec.n_heads, spec.head_dim)
    directions[1, 3, 0] = 1.0
    sigma = torch.full((spec.n_layers, spec.n_heads), 2.0)
    from_mask = HeadMask.from_heads([(1, 3)], spec.n_layers, spec.n_heads).to_plan("shift", -1.5, directions=directions,
                                                                                sigma=sigma)
    assert from_mask.shifts[(1, 3)][0] == -3.0 and from_mask.shifts[(1, 3)][1:].abs().sum() == 0
    with pytest.raises(HeadlabError, match="needs `directions`"):
        HeadMask.from_heads([(1, 3)], spec.n_layers, spec.n_heads).to_plan("shift", 1.0)
    with pytest.raises(PlanError, match="shift for head"):
        InterventionPlan().shift_heads({(0, 0): torch.ones(spec.head_dim + 1)}).for_model(spec)


@pytest.fixture(scope="module")
def refusal():
    model = headlab.load_model("zoo:safety-conflict")
    harmful, harmless = safety.zoo_dataset(32, True), safety.zoo_dataset(32, False)
    samples = probes.build_dataset(samples=[(p, "refuse") for p in harmful] + [(p, "comply") for p in harmless])
    return model, harmful, probes.score(model, samples, probes.ProbeConfig(positive="refuse"), progress=False)


def test_the_planted_refusal_head_encodes_refusal(refusal):
    _, _, result = refusal
    assert result.labels == ("comply", "refuse")
    assert result.accuracy[REFUSAL_HEAD] >= 0.95 and result.auroc[REFUSAL_HEAD] >= 0.99
    best = result.log_likelihood.top(2)
    assert best[0][:2] == REFUSAL_HEAD and best[0][2] > -0.2 and best[1][2] < -0.4  # far ahead of the next head
    # the directions point toward "refuse": the positive class scores higher along them
    proj = result.outputs[:, REFUSAL_HEAD[0], REFUSAL_HEAD[1]] @ result.directions[REFUSAL_HEAD]
    assert proj[result.y == 1].mean() > proj[result.y == 0].mean()


def test_steering_the_refusal_head_against_its_direction_stops_refusals(refusal):
    model, harmful, result = refusal
    matcher = safety.RefusalMatcher(("sorry", "cannot"), min_chars=0)
    prompts = harmful[:24]
    before, _ = safety.refusal_rate(model, prompts, None, matcher)
    after, _ = safety.refusal_rate(model, prompts, probes.shift_plan(result, [REFUSAL_HEAD], -4.0), matcher)
    others = [(l, h) for l in range(model.spec.n_layers) for h in range(model.spec.n_heads) if (l, h) != REFUSAL_HEAD]
    rng = random.Random(0)
    controls = [safety.refusal_rate(model, prompts, probes.shift_plan(result, [rng.choice(others)], -4.0), matcher)[0]
                for _ in range(3)]
    assert before >= 0.9 and after <= 0.2
    assert min(controls) >= 0.8  # the same shift on random heads leaves refusals in place
    mass_mean, _ = safety.refusal_rate(model, prompts, probes.shift_plan(result, [REFUSAL_HEAD], -4.0, "mass_mean"), matcher)
    assert mass_mean <= 0.5  # ITI's other direction works too


def test_bad_labels():
    one = [probes.LabelledText("a", "x"), probes.LabelledText("b", "x")]
    with pytest.raises(HeadlabError, match="exactly two labels, found 1"):
        probes.classes(one)
    three = one + [probes.LabelledText("c", "y"), probes.LabelledText("d", "z")]
    with pytest.raises(HeadlabError, match="found 3"):
        probes.classes(three)
    with pytest.raises(HeadlabError, match="positive label 'q' is not among"):
        probes.classes([probes.LabelledText("a", "x"), probes.LabelledText("b", "y")], positive="q")


def test_probes_job_writes_scores_and_directions(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import app

    result = CliRunner().invoke(app, ["score", "probes", "zoo:safety-conflict", "--n", "12", "--out", str(tmp_path),
                                      "--run-id", "p"])
    assert result.exit_code == 0, result.output
    store = RunStore(tmp_path)
    assert set(store.scores("p")) == {"probe_accuracy", "probe_auroc", "probe_log_likelihood"}
    from safetensors.torch import load_file

    saved = load_file(str(store.file("p", store.manifest("p")["files"]["tensors:probe_directions"])))
    assert saved["directions"].shape == (2, 4, 32) and saved["sigma"].shape == (2, 4)  # 2 layers x 4 heads, head_dim 32
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    result = CliRunner().invoke(app, ["score", "probes", "zoo:safety-conflict", "--data", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "exactly two labels, found 1" in result.output


def test_image_presence_is_decodable_on_the_toy_vlm_and_shuffled_labels_are_not():
    """On zoo:shapes-llava, heads' outputs at the last prompt token tell a shape from an empty scene;
    the same probes on shuffled labels stay near chance (the probes do not just fit noise)."""
    model = headlab.load_model("zoo:shapes-llava")
    samples = probes.image_presence_samples(24)
    result = probes.score(model, samples, probes.ProbeConfig(positive="image"), progress=False)
    layer, head, best = result.accuracy.top(1)[0]
    assert best >= 0.9 and result.auroc[(layer, head)] >= 0.95
    labels = [s.label for s in samples]
    random.Random(1).shuffle(labels)
    shuffled = [probes.LabelledText(s.text, lab, s.image) for s, lab in zip(samples, labels)]
    control = probes.score(model, shuffled, probes.ProbeConfig(positive="image"), progress=False)
    assert control.accuracy.values.mean() < 0.65 and control.accuracy.top(1)[0][2] < best
