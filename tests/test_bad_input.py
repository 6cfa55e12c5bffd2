"""Bad input gets an error that names the problem; never a silent wrong answer."""

from __future__ import annotations

import json

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
    with pytest.raises(ModelNotFoundError, match="no local directory .* not in the local Hugging Face cache; HF_HUB_OFFLINE"):
        headlab.load_model("headlab-tests/definitely-not-a-model")


def test_a_bare_name_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    """A bare name that is no local directory and not cached: one short connection attempt, not
    half a minute of retries (the socket is made to fail at once here)."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def refuse(address, timeout=None, *a, **kw):
        calls.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ModelNotFoundError, match=r"write \./mymodel for a local path.*unreachable \(Network is unreachable\)"):
        headlab.load_model("mymodel")
    assert len(calls) == 1 and calls[0][1] <= 2.0


@pytest.mark.parametrize("arch", ["t5", "gpt_oss"])
def test_unsupported_attention_is_refused_at_load_and_info(tmp_path, arch):
    """T5 (relative position bias) and GPT-OSS (learned sinks) cannot run patched: refused when loaded
    and by `headlab info`, not at the first forward (and they still load for comparison with eager)."""
    from typer.testing import CliRunner

    from headlab.cli import app

    if arch == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0)
        transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
        match = "T5Attention adds a relative position bias"
    else:
        config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                           num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"])
        transformers.GptOssForCausalLM(config).save_pretrained(tmp_path)
        match = "GptOssAttention has learned attention sinks"
    with pytest.raises(UnsupportedArchitectureError, match=match):
        headlab.load_model(tmp_path)
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and match in result.output
    assert headlab.load_model(tmp_path, attn_implementation="eager", load_tokenizer=False).spec.n_layers == 2


@pytest.mark.parametrize("span, expected", [
    ((40, 52), list(range(40, 52))),
    ((__import__("numpy").int64(40), __import__("numpy").int64(52)), list(range(40, 52))),
    ((torch.tensor(3), torch.tensor(6)), [3, 4, 5]),
    ([40, 52], [40, 52]),
    (range(2, 5), [2, 3, 4]),
    (__import__("numpy").array([1, 5]), [1, 5]),
    (torch.tensor([7, 2]), [7, 2]),
    ((1, 2, 3), [1, 2, 3]),
])
def test_span_forms(span, expected):
    """A tuple of two integers of any kind is a [start, end) range; other iterables list positions."""
    from headlab.stats import _span_positions

    assert _span_positions("s", span).tolist() == expected


@pytest.mark.parametrize("span, match", [
    ([0, 0, 0, 0, 0], r"repeats key positions \[0\]"),
    ([3, 4, 3], r"repeats key positions \[3\]"),
    ((40.0, 52.0), "needs two integer positions, got float and float"),
    ((True, 3), "got bool and int"),
    ([1.5], "not an integer"),
    (torch.tensor([1.0, 2.0]), "not an integer"),
    ((5, 2), "need 0 <= start <= end"),
    ([-1], "negative"),
    ("ab", "must be a"),
])
def test_bad_spans(model, span, match):
    with pytest.raises(PlanError, match=match):
        with model.patched(None, headlab.StatsRequest(spans={"s": span})):
            model(ids(64))


def test_repeated_positions_no_longer_count_twice(model):
    """The mass on a span is at most 1 (the old [0, 0, 0, 0, 0] gave 5.0)."""
    with model.patched(None, headlab.StatsRequest(spans={"all": range(16)})) as rec:
        model(ids(16))
    torch.testing.assert_close(rec.stats.span_mass("all"), torch.ones_like(rec.stats.span_mass("all")), atol=1e-5, rtol=0)


@pytest.mark.parametrize("command, message", [
    (["score", "retrieval", "zoo:tasks-llama", "--depths", "1.5"], r"--depths must be fractions of the context in \[0, 1\], got \[1.5\]"),
    (["score", "retrieval", "zoo:tasks-llama", "--lengths", "0"], r"--lengths must be positive integers"),
    (["score", "select-copy", "zoo:tasks-llama", "--labels", "greek"], "--labels must be one of digits, letters, lower, got 'greek'"),
    (["intervene", "act", "zoo:tasks-llama", "--calibration-fraction", "1.5"], r"--calibration-fraction must be in \(0, 1\)"),
    (["intervene", "zerotuning", "zoo:tasks-llama", "--calibration-fraction", "0"], r"--calibration-fraction must be in \(0, 1\)"),
    (["intervene", "ph3", "zoo:tasks-llama", "--toward", "context", "--k", "99"], "--k 99 is more than the model's 32 heads"),
    (["intervene", "vhr", "zoo:shapes-llava", "--k", "99"], "--k 99 is more than the 8 heads of a layer"),
    (["intervene", "var", "zoo:shapes-llava", "--p", "1.5"], r"--p must be in \(0, 1\)"),
    (["score", "sinks", "zoo:shapes-llava"], "give --data"),
    (["score", "sinks", "zoo:tasks-llama", "--data", "missing.txt"], "missing.txt: no such file; give the path of a UTF-8 text file"),
    (["score", "patterns", "zoo:tasks-llama", "--data", "missing.txt"], "missing.txt: no such file"),
    (["score", "select-copy", "zoo:pycode-llama"], "select-and-copy heads do not apply to zoo:pycode-llama"),
    (["score", "safety", "zoo:pycode-llama"], "safety heads do not apply to zoo:pycode-llama"),
])
def test_cli_options_are_checked_before_anything_runs(tmp_path, command, message):
    import re

    from typer.testing import CliRunner

    from headlab.cli import app

    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_text_analyses_run_on_a_vision_language_model(tmp_path):
    """Text prompts on a VLM go through its text tokenizer (its processor would read them as images)."""
    from headlab import jobs

    texts = tmp_path / "t.txt"
    texts.write_text("a small red square on a white field\nthe blue circle is left of the shape\n")
    run = jobs.run("sinks", "zoo:shapes-llava", tmp_path / "runs", data=str(texts), progress=False)
    assert json.loads((run / "summary.json").read_text())["texts"] == 2


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
