"""Bad input gets an error that names the problem; never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch
import transformers

import headlab
from headlab.errors import ModelNotFoundError, PlanError, UnsupportedArchitectureError
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def model(llama_dir):
    return headlab.load_model(llama_dir)


def ids(n=16):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def test_plan_with_missing_layer(model):
    with pytest.raises(PlanError, match=r"layer 7 does not exist.*layers 0\.\.1"):
        with model.patched(headlab.InterventionPlan().prune_heads([(7, 0)])):
            pass


def test_plan_with_missing_head(model):
    with pytest.raises(PlanError, match=r"head 9 does not exist.*heads 0\.\.3"):
        with model.patched(headlab.InterventionPlan().scale_first_token({(1, 9): 2.0})):
            pass


def test_plan_built_for_another_model(model):
    plan = headlab.InterventionPlan().prune_heads([(0, 0)])
    bigger = headlab.ModelSpec(**{**model.spec.to_dict(), "n_layers": 32, "n_heads": 8})
    with pytest.raises(PlanError, match=r"built for a model with \(layers, heads, head_dim\) = \(32, 8, 16\)"):
        with model.patched(plan.for_model(bigger)):
            pass


def test_mean_ablation_with_wrong_head_dim(model):
    plan = headlab.InterventionPlan().ablate_heads([(0, 0)], "mean", means={(0, 0): torch.zeros(7)})
    with pytest.raises(PlanError, match="head_dim"):
        with model.patched(plan):
            pass


def test_span_outside_the_sequence(model):
    with pytest.raises(PlanError, match=r"span 'needle' reaches key position 39.*only 16 keys"):
        with model.patched(None, headlab.StatsRequest(spans={"needle": (30, 40)})):
            model(ids(16))


def test_query_window_outside_the_call(model):
    with pytest.raises(PlanError, match="query window"):
        with model.patched(None, headlab.StatsRequest(argmax=True, queries=[3, 40])):
            model(ids(16))


def test_key_bias_beyond_the_sequence(model):
    with pytest.raises(PlanError, match="biases key position 50"):
        with model.patched(headlab.InterventionPlan().key_bias({(0, 0): 1.0}, 50)):
            model(ids(16))


def test_patch_of_the_wrong_length(model):
    plan = headlab.InterventionPlan().patch_heads({(0, 1): torch.zeros(1, 5, model.spec.head_dim)})
    with pytest.raises(PlanError, match="same shape"):
        with model.patched(plan):
            model(ids(16))


def test_invalid_values():
    with pytest.raises(PlanError, match="gamma"):
        headlab.InterventionPlan().scale_first_token({(0, 0): 0.0})
    with pytest.raises(PlanError, match="beta"):
        headlab.InterventionPlan().act([(0, 0)], beta=1.5)
    with pytest.raises(PlanError, match="mean ablation needs"):
        headlab.InterventionPlan().ablate_heads([(0, 0)], "mean")
    with pytest.raises(PlanError, match="pair"):
        headlab.InterventionPlan().prune_heads([3])
    with pytest.raises(PlanError, match="span"):
        headlab.StatsRequest(spans={"x": (5, 2)}).compile(8, 8, torch.device("cpu"))


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        headlab.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        headlab.load_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no zoo model named 'nope'"):
        headlab.load_model("zoo:nope")


def test_unreachable_hub_name(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelNotFoundError, match="not a local directory"):
        headlab.load_model("headlab-tests/definitely-not-a-model")


def test_unsupported_architecture(tmp_path):
    config = transformers.MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=4,
                                      architectures=["MambaForCausalLM"])
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM has no attention heads"):
        headlab.load_model(tmp_path)


def test_sliding_window_cache_refuses_position_stats(tiny_dirs):
    gemma = headlab.load_model(tiny_dirs("gemma2"))  # sliding window 8 on layer 0
    prompt = ids(12)
    with pytest.raises(PlanError, match="sliding-window cache has dropped early tokens"):
        with gemma.patched(None, headlab.StatsRequest(argmax=True)):
            gemma.generate(prompt, max_new_tokens=3, do_sample=False)


def test_model_loaded_without_headlab_attention(llama_dir):
    eager = headlab.load_model(llama_dir, attn_implementation="eager")
    with pytest.raises(headlab.HeadlabError, match="not 'headlab'"):
        with eager.patched(headlab.InterventionPlan()):
            pass


def test_nested_sessions_are_refused(model):
    with model.patched():
        with pytest.raises(PlanError, match="do not nest"):
            with model.patched():
                pass


def test_stats_read_before_recording():
    with pytest.raises(PlanError, match="no stats were recorded"):
        headlab.HeadStats().argmax


def test_stat_not_requested(model):
    with model.patched(None, headlab.StatsRequest(entropy=True)) as rec:
        model(ids(8))
    with pytest.raises(PlanError, match="'argmax' was not requested"):
        rec.stats.argmax


def test_empty_query_window_records_empty_stats(model):
    with model.patched(None, headlab.StatsRequest(argmax=True, queries=[])) as rec:
        model(ids(8))
    assert rec.stats.argmax.shape[-1] == 0
