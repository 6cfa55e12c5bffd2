"""Greedy decoding with a replayed decode step (`headlab.decode`), held to `generate()`.

On the CPU the step runs eagerly over the static cache and key mask the graph replays: tokens and
stats must equal what `generate(do_sample=False)` gives under the same session. On a GPU the
captured step must give what the eager step gives, for plain attention, score plans, calibrated
ACT and probability stats, and sessions a graph cannot hold must say why.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import headlab
from headlab.decode import StepCache, graph_blocker, greedy_decode
from headlab.errors import HeadlabError

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def pycode():
    return headlab.load_model("zoo:pycode-llama", dtype=torch.float32, device="cpu")


def prompt_ids(model, texts):
    tok = model.text_tokenizer
    return [tok(t)["input_ids"] for t in texts]


def left_padded(rows, pad=0, device="cpu"):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


TEXTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nfor name in os.listdir(", "class Point:\n"]


def test_matches_generate_without_a_session(pycode, caplog):
    ids = torch.tensor(prompt_ids(pycode, TEXTS[:1]))
    for n in (1, 2, 17):
        want = pycode.generate(ids, max_new_tokens=n, do_sample=False)
        with caplog.at_level("DEBUG", logger="headlab.decode"):
            got = greedy_decode(pycode, ids, n)
        assert torch.equal(got, want), n
    assert "'prefill'" in caplog.text and "'eager_steps_16'" in caplog.text  # the DEBUG phase timings
    assert torch.equal(pycode.greedy_decode(ids, 5), pycode.generate(ids, max_new_tokens=5, do_sample=False))


def test_left_padded_batch_with_end_tokens_matches_generate(pycode):
    ids, mask = left_padded(prompt_ids(pycode, TEXTS))
    free = pycode.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=1)
    # an end token that row 0 produces early and row 1 later: rows finish at different steps
    eos = [int(free[0, ids.shape[1] + 2]), int(free[1, ids.shape[1] + 6])]
    want = pycode.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=1)
    got = greedy_decode(pycode, ids, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, want)
    assert (got[0, ids.shape[1] + 3:] == 1).all()  # row 0 padded after its end token
    # a check every step stops at the same place
    assert torch.equal(greedy_decode(pycode, ids, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=1,
                                     check_every=1), want)


def test_plan_and_stats_match_generate(pycode):
    ids, mask = left_padded(prompt_ids(pycode, TEXTS[:2]))
    # keys past row 1's padding: a padded key's logit depends on the position ids transformers gives padding
    request = headlab.StatsRequest(argmax=True, entropy=True, received=True, head_outputs=True, spans={"first": (9, 11)},
                                   keys=[9, 12], queries=slice(-1, None))
    plan = (headlab.InterventionPlan().scale_first_token({(1, h): 3.0 for h in range(8)})
            .prune_heads([(2, h) for h in range(4)]).scale_heads({(3, 3): 1.3}))
    kw = dict(attention_mask=mask, pad_token_id=0)
    with pycode.patched(plan, request) as want:
        want_ids = pycode.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, **kw)
    with pycode.patched(plan, request) as got:
        got_ids = greedy_decode(pycode, ids, 9, eos_token_id=[], **kw)
    assert torch.equal(got_ids, want_ids)
    a, b = want.stats, got.stats
    assert a.n_calls() == b.n_calls() == 9  # the prefill + 8 decode steps, one call each
    assert torch.equal(a.query_positions, b.query_positions)
    assert torch.equal(a.argmax, b.argmax)
    for name in ("entropy", "argmax_prob", "received", "received_count", "head_outputs", "key_probs", "key_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(b.span_mass("first"), a.span_mass("first"), atol=2e-5, rtol=1e-4)
    # the plan changed the tokens (it is applied at every step, not only the prefill)
    assert not torch.equal(pycode.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None, **kw), want_ids)


def test_calibrated_act_matches_generate(pycode):
    ids = torch.tensor(prompt_ids(pycode, TEXTS[:1]))
    plan = headlab.InterventionPlan().act_with_sinks({(l, h): [0, 3] for l in range(2) for h in range(0, 8, 2)}, beta=0.4)
    with pycode.patched(plan):
        want = pycode.generate(ids, max_new_tokens=8, do_sample=False)
    with pycode.patched(plan):
        assert torch.equal(greedy_decode(pycode, ids, 8), want)


def test_session_positions_continue_after_decoding(pycode):
    """A forward after greedy_decode in the same session numbers its stats as after generate()."""
    ids = torch.tensor(prompt_ids(pycode, TEXTS[:1]))
    req = headlab.StatsRequest(argmax=True, queries=slice(-1, None))
    with pycode.patched(None, req) as rec:
        greedy_decode(pycode, ids, 4)
    assert rec.stats.query_positions.tolist() == [ids.shape[1] - 1 + i for i in range(4)]


def test_bad_input_is_refused(pycode):
    ids = torch.tensor(prompt_ids(pycode, TEXTS[:1]))
    with pytest.raises(HeadlabError, match="max_new_tokens"):
        greedy_decode(pycode, ids, 0)
    with pytest.raises(HeadlabError, match=r"\[batch, tokens\]"):
        greedy_decode(pycode, ids[0], 4)
    right = torch.ones_like(ids)
    right[0, -1] = 0
    with pytest.raises(HeadlabError, match="pad on the\nleft|padding_side"):
        greedy_decode(pycode, ids, 4, attention_mask=right)
    with pytest.raises(HeadlabError, match="cuda_graph=True.*cpu"):
        greedy_decode(pycode, ids, 4, cuda_graph=True)


def test_generation_settings_it_cannot_match_are_refused(pycode):
    config = pycode.model.generation_config
    config.repetition_penalty = 1.3
    try:
        with pytest.raises(HeadlabError, match="repetition_penalty.*model.generate"):
            greedy_decode(pycode, torch.tensor(prompt_ids(pycode, TEXTS[:1])), 4)
    finally:
        config.repetition_penalty = 1.0


def test_sliding_window_models_are_refused(tiny_dirs):
    model = headlab.load_model(str(tiny_dirs("mistral")), dtype=torch.float32, device="cpu")
    with pytest.raises(HeadlabError, match="sliding-window"):
        greedy_decode(model, torch.tensor([[1, 2, 3]]), 3)


def test_decode_sink_sets_are_bounded_on_the_host():
    """A decode step's ACT sink sets have a size known without reading the GPU: a calibrated head's
    positions, an input-adaptive head's ⌊1/τ⌋ (one row's probabilities sum to 1) — what lets a CUDA
    graph hold input-adaptive ACT; and the bound is a bound: no row of a decode step exceeds it."""
    from headlab.kernels.reference import act_sink_sets

    plan = (headlab.InterventionPlan().act([(0, 0)], tau=0.1).act([(0, 1)], tau=0.3)
            .act_with_sinks({(0, 2): [1, 4, 9]}))
    lp = plan.compile_layer(0, 4, 16)
    assert lp.act_decode_sink_bound(100) == 10 and lp.act_decode_sink_bound(6) == 6
    assert headlab.InterventionPlan().act([(0, 0)], tau=0.0).compile_layer(0, 4, 16).act_decode_sink_bound(50) == 50
    assert headlab.InterventionPlan().act_with_sinks({(0, 3): [2, 7]}).compile_layer(0, 4, 16).act_decode_sink_bound(50) == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # rows as flat as ACT allows: many keys just above τ
        probs = torch.softmax(torch.randn(3, 4, 64, generator=g) * 0.3 + torch.linspace(0, 6, 64), -1)
        sets = act_sink_sets(probs, torch.ones_like(probs), lp)
        assert int(sets.sum(-1).max()) <= lp.act_decode_sink_bound(64)


def test_step_cache_writes_at_the_device_position():
    keys = [torch.zeros(1, 2, 5, 4)]
    values = [torch.zeros(1, 2, 5, 4)]
    at = torch.tensor([3])
    cache = StepCache(keys, values, at)
    k, v = cache.update(torch.ones(1, 2, 1, 4), 2 * torch.ones(1, 2, 1, 4), 0)
    assert k is keys[0] and v is values[0]
    assert k[0, :, 3].eq(1).all() and k[0, :, [0, 1, 2, 4]].eq(0).all() and v[0, :, 3].eq(2).all()


# ---- on a GPU: the captured step ------------------------------------------------------------

def tiny_cuda_llama(head_dim: int = 64, layers: int = 3):
    from headlab import attention
    from headlab.model import HeadModel
    from headlab.spec import ModelSpec

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=4 * head_dim, intermediate_size=512,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, architectures=["LlamaForCausalLM"], initializer_range=0.1)
    attention.register()
    config._attn_implementation = attention.ATTN_IMPLEMENTATION
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return HeadModel(model=model, tokenizer=None, spec=ModelSpec.from_config(config), name="tiny-llama (random, cuda)")


CUDA_PLANS = {
    "none": None,
    "zerotuning": headlab.InterventionPlan().scale_first_token({(l, h): 1.8 for l in range(3) for h in (0, 3)}),
    "prune_scale": headlab.InterventionPlan().prune_heads([(1, 1)]).scale_heads({(2, 2): 1.4}),
    "act_calibrated": headlab.InterventionPlan().act_with_sinks({(l, h): [0, 5] for l in range(3) for h in range(4)}),
    "act_adaptive": headlab.InterventionPlan().act([(l, h) for l in range(3) for h in range(4)], beta=0.4, tau=0.05),
}


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("plan_name", list(CUDA_PLANS))
@pytest.mark.parametrize("stats", [False, True])
def test_graph_replay_equals_the_eager_step(plan_name, stats, caplog):
    model = tiny_cuda_llama()
    plan = CUDA_PLANS[plan_name]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (40, 57)]
    ids, mask = left_padded(rows, device="cuda")
    request = (headlab.StatsRequest(argmax=True, entropy=True, received=True, spans={"start": (0, 4)},
                                    queries=slice(-1, None)) if stats else None)
    assert graph_blocker(model, None) is None
    results = {}
    for graphed in (False, True):
        caplog.clear()
        with model.patched(plan, request) as rec, caplog.at_level("DEBUG", logger="headlab.decode"):
            if graphed:
                assert graph_blocker(model, rec) is None
            out = greedy_decode(model, ids, 12, attention_mask=mask, eos_token_id=[], cuda_graph=graphed)
        # the phases it went through: 10 replays after the eager first step and the capture
        assert ("replays_10" if graphed else "eager_steps_11") in caplog.text
        results[graphed] = (out, rec.stats)
    (a, sa), (b, sb) = results[False], results[True]
    assert torch.equal(a, b)
    if stats:
        assert sa.n_calls() == sb.n_calls() == 12
        assert torch.equal(sa.query_positions, sb.query_positions)
        assert torch.equal(sa.argmax, sb.argmax)
        for name in ("entropy", "received", "received_count"):
            torch.testing.assert_close(getattr(sb, name), getattr(sa, name), msg=name)
        torch.testing.assert_close(sb.span_mass("start"), sa.span_mass("start"))
    if plan is None and not stats:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert torch.equal(b, want)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_stops_at_end_tokens_like_generate():
    model = tiny_cuda_llama()
    ids = torch.randint(3, 512, (1, 30), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    free = greedy_decode(model, ids, 20, eos_token_id=[], cuda_graph=True)
    eos = int(free[0, 30 + 11])
    want = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(greedy_decode(model, ids, 20, eos_token_id=eos, pad_token_id=0, cuda_graph=True), want)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_short_generations_run_eagerly(caplog):
    """Under MIN_GRAPH_STEPS decode steps the capture would cost more than it saves: eager steps."""
    from headlab.decode import MIN_GRAPH_STEPS

    model = tiny_cuda_llama()
    ids = torch.randint(3, 512, (1, 20), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    n = MIN_GRAPH_STEPS  # new tokens: the prefill's + MIN_GRAPH_STEPS - 1 decode steps
    with caplog.at_level("DEBUG", logger="headlab.decode"):
        got = greedy_decode(model, ids, n, eos_token_id=[], cuda_graph=True)
    assert f"eager_steps_{n - 1}" in caplog.text and "replays" not in caplog.text
    assert torch.equal(got, model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_sessions_a_graph_cannot_hold_say_why_and_decode_eagerly():
    model = tiny_cuda_llama()
    ids = torch.randint(3, 512, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    var = headlab.InterventionPlan().redistribute([(0, 1)], sources=[0, 1], targets=[2, 3, 4])
    with model.patched(var) as rec:
        assert "VAR" in graph_blocker(model, rec)
        with pytest.raises(HeadlabError, match="cuda_graph=True, but.*VAR"):
            greedy_decode(model, ids, 4, cuda_graph=True)
        auto = greedy_decode(model, ids, 6)
    with model.patched(var):
        assert torch.equal(auto, greedy_decode(model, ids, 6, cuda_graph=False))
    with model.patched(None, headlab.StatsRequest(matches={"m": headlab.stats.TokenMatch(torch.zeros(40, dtype=torch.long),
                                                                                            torch.zeros(40, dtype=torch.long))})) as rec:
        assert "token-match" in graph_blocker(model, rec)


def test_greedy_tokens_is_generate_on_the_cpu(pycode, monkeypatch):
    """`headlab.generate.greedy_tokens` (what the retrieval analysis decodes with) keeps
    `generate()` on the CPU and takes `greedy_decode` on a GPU (next test)."""
    from headlab import decode
    from headlab.generate import greedy_tokens

    monkeypatch.setattr(decode, "greedy_decode", lambda *a, **k: pytest.fail("greedy_decode on the CPU"))
    ids = torch.tensor(prompt_ids(pycode, TEXTS[:1]))
    assert torch.equal(greedy_tokens(pycode, ids, 6, eos_token_id=[5, 6]),
                       pycode.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[5, 6]))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_greedy_tokens_takes_the_graph_on_a_gpu(monkeypatch):
    from headlab import decode
    from headlab.generate import greedy_tokens

    model = tiny_cuda_llama()
    calls = []
    original = decode.greedy_decode
    monkeypatch.setattr(decode, "greedy_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(3, 512, (1, 30), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    with model.patched(None, headlab.StatsRequest(argmax=True, queries=slice(-1, None))) as rec:
        got = greedy_tokens(model, ids, 10, eos_token_id=[1], pad_token_id=0)
    assert calls and rec.stats.argmax.shape[-1] == got.shape[1] - 30
    assert torch.equal(got, model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[1], pad_token_id=0))
