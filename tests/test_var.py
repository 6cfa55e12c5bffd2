"""VAR: the redistribution inside the patched attention (against the formula on the baseline
probabilities), its plan plumbing, the kernel dispatch, and the visual-sink analysis on a tiny
LLaVA with a planted massive activation."""

from __future__ import annotations

import pytest
import torch

from headlab import InterventionPlan, PlanError, StatsRequest, load_model
from headlab.analyses import visual_sinks
from headlab.analyses.vision_heads import VisionSample
from headlab.kernels import KERNEL_ENV, KernelUnavailableError, patched_attention

from .test_vision_heads import IMAGE_TOKEN, N_IMAGE, llava_dir  # noqa: F401 - the fixture

SOURCES, TARGETS = [3, 4], [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def text_model():
    return load_model("zoo:tasks-llama")


def _probs(model, ids, plan):
    n = ids.shape[1]
    with model.patched(plan, StatsRequest(keys=list(range(n)), queries=slice(-3, None))) as rec:
        model(ids)
    return rec.stats.key_probs[:, 0]  # [L, H, 3, K]


@pytest.mark.parametrize("p", [0.0, 0.6, 1.0])
def test_redistribution_follows_the_formula(text_model, p):
    ids = text_model.tokenize("the code of k11 is v2 v39 . group house in way river fact world story answer :")["input_ids"]
    base = _probs(text_model, ids, None)
    plan = InterventionPlan().redistribute([(1, 2), (3, 5)], SOURCES, TARGETS, p=p)
    got = _probs(text_model, ids, plan)
    a = base[1, 2]
    s, t = a[:, SOURCES].sum(-1, keepdim=True), a[:, TARGETS].sum(-1, keepdim=True)
    expected = a.clone()
    expected[:, SOURCES] *= 1 - p
    expected[:, TARGETS] *= 1 + p * s / t
    torch.testing.assert_close(got[1, 2], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, 2].sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 3], base[1, 3], atol=1e-6, rtol=0)  # untouched head
    torch.testing.assert_close(got[0], base[0], atol=1e-6, rtol=0)  # layers before the first VAR layer


def test_plan_plumbing():
    plan = InterventionPlan().redistribute([(0, 1)], [2, 3], [4, 5], p=0.5)
    assert InterventionPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    both = plan + InterventionPlan().redistribute({(1, 0): 0.3}, [2, 3], [4, 5])
    assert both.var_heads == {(0, 1): 0.5, (1, 0): 0.3} and both.heads() == {(0, 1), (1, 0)}
    with pytest.raises(PlanError, match="one VAR source / target set"):
        plan + InterventionPlan().redistribute([(1, 0)], [9], [4])
    with pytest.raises(PlanError, match="overlap at positions \\[4\\]"):
        InterventionPlan().redistribute([(0, 0)], [4], [4, 5])
    with pytest.raises(PlanError, match="must be in \\[0, 1\\]"):
        InterventionPlan().redistribute([(0, 0)], [1], [2], p=1.5)
    layer = plan.compile_layer(0, 4, 16)
    assert layer.has_var and layer.touches_probabilities and layer.facts["max_var_position"] == 5


def test_triton_defers_var_to_the_reference(monkeypatch):
    plan = InterventionPlan().redistribute([(0, 1)], [1], [2, 3]).compile_layer(0, 4, 16)
    q = torch.randn(1, 4, 6, 16)
    k = v = torch.randn(1, 2, 6, 16)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    with pytest.raises(KernelUnavailableError, match="VAR attention redistribution"):
        patched_attention(q, k, v, scaling=0.25, plan=plan)
    monkeypatch.setenv(KERNEL_ENV, "reference")
    out, _ = patched_attention(q, k, v, scaling=0.25, plan=plan)
    assert out.shape == (1, 4, 6, 16)


def test_visual_sinks_find_a_planted_massive_activation(llava_dir):  # noqa: F811
    model = load_model(llava_dir, load_tokenizer=False)
    torch.manual_seed(2)
    ids = torch.tensor([1, 5] + [IMAGE_TOKEN] * N_IMAGE + [7, 8, 9])
    sample = VisionSample(ids, torch.randn(1, 3, 32, 32))
    planted = 2 + 6  # the 7th image token
    layers = model.model.model.language_model.layers

    def massive(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0, 7] += 400.0  # the text sink's massive dimension
        if hidden.shape[1] > planted:
            hidden[:, planted, 7] += 400.0
        return output

    hook = layers[0].register_forward_hook(massive)
    try:
        # with d = 64, one massive dimension gives φ ≈ √64 = 8 at most: τ = 5 here (the paper's 20 is for d ≥ 4096)
        found = visual_sinks.find(model, sample, layer=1, tau=5.0, n_dims=1, min_image_mass=0.0, rho=0.0)
    finally:
        hook.remove()
    assert found.sink_dims == [7] and found.sinks == [planted]
    assert found.image == list(range(2, 2 + N_IMAGE)) and len(found.image_centric) == 8  # rho = 0: every head
    plan = found.plan(p=0.6)
    assert plan.var_sources == (planted,) and planted not in plan.var_targets and len(plan.var_targets) == N_IMAGE - 1

    none = visual_sinks.find(model, sample, layer=1, tau=5.0)  # no hook: a random model has no massive activations
    assert none.sinks == []
    with pytest.raises(Exception, match="no visual sink tokens"):
        none.plan()
