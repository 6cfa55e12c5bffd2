"""headlab inside TransformerLens (a TransformerBridge running the patched attention) and nnsight
(plans and stats in trace / generate): the same plans, stats and scores on every route (issue 17)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import headlab
from headlab import StatsRequest, attention, zoo
from headlab.analyses import code_tasks, conflict, patterns, probes, retrieval, safety, select_copy, sinks
from headlab.errors import HeadlabError, PlanError, UnsupportedArchitectureError
from headlab.plan import InterventionPlan
from headlab.zoo import corpus, tasks

tl = pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from headlab.integrations import nnsight as nns  # noqa: E402
from headlab.integrations import transformer_lens as tli  # noqa: E402

ZOO_TEXT = ["tasks-llama", "mcqa-planted", "safety-conflict", "pycode-llama"]
MODEL = "zoo:tasks-llama"
PLAN = InterventionPlan().prune_heads([(1, 2)]).scale_first_token({(2, 1): 3.0}).uniform_attention([(3, 0)])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _native_bridge(name: str = "tasks-llama"):
    """TransformerLens's own bridge (eager attention, its own N×N pattern)."""
    return TransformerBridge.boot_transformers(str(zoo.path(name)), device="cpu")


@pytest.fixture(scope="module")
def ids():
    model = headlab.load_model(MODEL)
    return model.tokenize(["the capital of france is", "hello world and more"], padding=True)["input_ids"][:, :5]


# ---- TransformerLens ---------------------------------------------------------------------------


def test_bridge_runs_the_patched_attention(ids):
    """to_bridge: the bridge's forward and run_with_cache go through headlab — logits equal the
    HeadModel's with and without a plan, stats are recorded, and TL's hooks see the intervened
    values (the pruned head is exactly zero at hook_z)."""
    ref = headlab.load_model(MODEL)
    model = headlab.load_model(MODEL)
    keys = set(model.model.state_dict())
    bridge = tli.to_bridge(model)
    assert tli.to_bridge(model) is bridge
    assert model.model.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert not any(k.startswith(tli.BRIDGE_ATTR) for k in model.model.state_dict())  # the bridge is no submodule
    assert len(keys) > 0
    torch.testing.assert_close(bridge(ids), ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    with ref.patched(PLAN):
        want = ref(input_ids=ids).logits
    with model.patched(PLAN, StatsRequest(entropy=True, head_outputs=True)) as rec:
        logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert rec.stats.entropy.shape == (4, 2, 8, 5)
    z = cache["blocks.1.attn.hook_z"]  # [B, T, H, D]
    assert z.shape == (2, 5, 8, 16) and z[:, :, 2].abs().max() == 0 and z[:, :, 3].abs().max() > 0
    torch.testing.assert_close(z.transpose(1, 2), rec.stats.head_outputs[1].to(z.dtype), rtol=0, atol=1e-6)
    # a TL hook edit at hook_z flows into the patched forward like a plan would
    bridge.reset_hooks()
    edited = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", _zero_head(2))])
    with ref.patched(InterventionPlan().prune_heads([(1, 2)])):
        torch.testing.assert_close(edited, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def _zero_head(h):
    def hook(z, hook):
        z = z.clone()
        z[:, :, h] = 0
        return z
    return hook


def test_bridge_hooks_match_transformer_lens_own(ids):
    """Without a plan every hook both paths fire carries the same value as TL's own eager bridge:
    q/k/v, rotated q/k, z, scores, pattern, block and residual hooks."""
    native = _native_bridge()
    _, theirs = native.run_with_cache(ids)
    model = headlab.load_model(MODEL)
    _, ours = tli.to_bridge(model).run_with_cache(ids)
    common = [k for k in theirs.keys() if k in ours.keys()]
    assert len(common) >= 150
    for name in ("blocks.0.attn.hook_q", "blocks.2.attn.hook_v", "blocks.1.attn.hook_rot_k", "blocks.3.attn.hook_z",
                 "blocks.2.attn.hook_pattern", "blocks.1.hook_resid_post", "blocks.3.attn.hook_out"):
        assert name in common, name
    for name in common:
        a, b = ours[name], theirs[name]
        if name.endswith("hook_attn_scores"):  # masked entries: TL fills the dtype minimum, headlab −inf
            a, b = a.clamp_min(-1e4), b.clamp_min(-1e4)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4, msg=name)


def test_patterns_only_on_demand_and_with_the_plan(ids, monkeypatch):
    """hook_pattern is computed only for layers a hook asks for, reflects the plan (γ = 3 on the
    first key), and cannot be edited."""
    from headlab.kernels import reference

    model = headlab.load_model(MODEL)
    bridge = tli.to_bridge(model)
    calls = []
    real = reference.attention_pattern
    monkeypatch.setattr(reference, "attention_pattern", lambda *a, **k: calls.append(1) or real(*a, **k))
    bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert calls == []  # no N×N anywhere
    with model.patched(InterventionPlan().scale_first_token({(2, 1): 3.0})):  # layer 2's inputs stay as they were
        _, cache = bridge.run_with_cache(ids, names_filter="blocks.2.attn.hook_pattern")
    assert len(calls) == 1
    _, plain = bridge.run_with_cache(ids, names_filter="blocks.2.attn.hook_pattern")
    a, p = cache["blocks.2.attn.hook_pattern"][:, 1], plain["blocks.2.attn.hook_pattern"][:, 1]
    want0 = 3 * p[..., 0] / (1 + 2 * p[..., 0])  # ZeroTuning's formula on the first key
    torch.testing.assert_close(a[..., 0], want0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=0, atol=1e-5)
    with pytest.raises(PlanError, match="a hook changed hook_pattern"):
        bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x * 0)])


def test_transformer_lens_tools_run_on_the_bridge(ids):
    """detect_head and transformer_lens.patching run on a headlab bridge and agree with TL's own."""
    from transformer_lens import patching as tl_patching
    from transformer_lens.head_detector import detect_head

    native = _native_bridge()
    model = headlab.load_model(MODEL)
    bridge = tli.to_bridge(model)
    texts = [tasks.needle(random.Random(s), length=(20, 40)).prompt for s in range(2)]
    for kind in ("previous_token_head", "induction_head"):
        torch.testing.assert_close(detect_head(bridge, texts, kind), detect_head(native, texts, kind), rtol=0, atol=1e-5)
    clean, corrupted = ids[:1], ids[1:]
    _, clean_cache = native.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    ours = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupted, clean_cache, metric)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(native, corrupted, clean_cache, metric)
    assert ours.shape == (4, 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_load_model_takes_a_bridge(ids):
    """load_model(bridge): a HeadModel over TL's own bridge, its attention switched to headlab."""
    bridge = _native_bridge()
    before = bridge(ids)
    model = headlab.load_model(bridge)
    assert model.backend == "transformer_lens" and model.spec.shape == (4, 8)
    torch.testing.assert_close(bridge(ids), before, rtol=0, atol=1e-5)
    with model.patched(InterventionPlan().prune_heads([(0, 1)])):
        _, cache = bridge.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
    assert cache["blocks.0.attn.hook_z"][:, :, 1].abs().max() == 0


def test_bridges_headlab_cannot_patch_are_refused(tmp_path):
    """A model whose attention headlab cannot run exactly is refused, never run as eager underneath."""
    import transformers

    config = transformers.GptOssConfig(vocab_size=400, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"])
    transformers.GptOssForCausalLM(config).save_pretrained(tmp_path)
    try:
        bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu",
                                                     tokenizer=headlab.load_model(MODEL).tokenizer)
    except Exception as exc:  # noqa: BLE001 - TL itself may not bridge it
        pytest.skip(f"TransformerLens does not bridge GPT-OSS here: {exc}")
    with pytest.raises(UnsupportedArchitectureError, match="learned attention sinks"):
        headlab.load_model(bridge)
    eager = headlab.load_model(MODEL, attn_implementation="eager")
    with pytest.raises(HeadlabError, match="load it with headlab's attention"):
        tli.to_bridge(eager)
    with pytest.raises(HeadlabError, match="TransformerBridge or an nnsight LanguageModel; got dict"):
        headlab.load_model({"model": 1})


# ---- nnsight -----------------------------------------------------------------------------------


def test_nnsight_trace_applies_plans_and_records_stats(ids):
    """Two invokes in one trace, a headlab plan and an nnsight edit of an MLP output: the logits
    equal headlab alone with the same edit as a forward hook; stats cover both invokes; per-head
    outputs read through `head_outputs` show the pruned head as zero."""
    model = headlab.load_model(MODEL)
    lm = nns.language_model(model)
    assert nns.language_model(model) is lm
    with model.patched(PLAN, StatsRequest(entropy=True)) as rec:
        with lm.trace() as tracer:
            with tracer.invoke(ids[:1]):
                z = nns.head_outputs(lm, 1).save()
                first = lm.output.logits.save()
            with tracer.invoke(ids[1:]):
                lm.model.layers[0].mlp.output[:] = 0
                second = lm.output.logits.save()
    assert z.shape == (1, 5, 8, 16) and z[..., 2, :].abs().max() == 0
    assert rec.stats.entropy.shape == (4, 2, 8, 5)  # both invokes, one batch
    with model.patched(PLAN):
        want_first = model(input_ids=ids[:1]).logits
        handle = model.model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            want_second = model(input_ids=ids[1:]).logits
        finally:
            handle.remove()
    torch.testing.assert_close(first, want_first, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, want_second, rtol=0, atol=1e-5)


def test_nnsight_generate_and_load_model(ids):
    """generate() under a plan through nnsight equals HeadModel.generate; load_model(lm) gives a
    HeadModel whose forwards run through nnsight."""
    model = headlab.load_model(MODEL)
    lm = nns.language_model(model)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with model.patched(PLAN):
        want = model.generate(ids[:1], **kw)
        with lm.generate(ids[:1], **kw):
            got = lm.generator.output.save()
    assert torch.equal(got, want)
    via = headlab.load_model(lm)
    assert via.backend == "nnsight" and isinstance(via, nns.NNsightHeadModel)
    with model.patched(PLAN):
        want_logits = model(input_ids=ids).logits
    with via.patched(PLAN):
        torch.testing.assert_close(via(input_ids=ids).logits, want_logits, rtol=0, atol=1e-5)
        assert torch.equal(via.generate(ids[:1], **kw), want)


# ---- the same scores on every route ------------------------------------------------------------


def _routes(name: str):
    hf = headlab.load_model(f"zoo:{name}")
    tl_model = headlab.load_model(f"zoo:{name}")
    tli.to_bridge(tl_model)
    nn_model = headlab.load_model(nns.language_model(headlab.load_model(f"zoo:{name}")))
    return {"hf": hf, "transformer_lens": tl_model, "nnsight": nn_model}


def _texts(model, name):
    if name == "pycode-llama":
        return corpus.texts(model.text_tokenizer, n=2, max_tokens=48, seed=2)
    return [tasks.needle(random.Random(s), length=(20, 40)).prompt for s in range(2)]


@pytest.mark.parametrize("name", ZOO_TEXT)
def test_every_analysis_scores_the_same_on_every_route(name):
    """sinks, patterns, Ships, retrieval, select-and-copy, path patching (conflict) and probes:
    identical HeadScores through Hugging Face, the TransformerLens bridge and nnsight (fp32, 1e-5)."""
    routes = _routes(name)
    hf = routes["hf"]
    texts = _texts(hf, name)
    heads = [(0, 0), (1, 1), (hf.spec.n_layers - 1, hf.spec.n_heads - 1)]
    code = name == "pycode-llama"
    needles = retrieval.zoo_dataset(lengths=(48,), depths=(0.5,), per_cell=2) if not code else None
    mcqa = select_copy.zoo_dataset(8) if not code else None
    pairs = code_tasks.copy_pairs(hf.text_tokenizer, n=4, length=48) if code else conflict.zoo_dataset(4)
    labelled = probes.build_dataset(samples=[(t, i % 2) for i, t in enumerate(texts * 4)])

    def run(model):
        out = {"first_mass": sinks.score(model, texts, progress=False).first_token_mass,
               "induction": patterns.score(model, patterns.encode_texts(model, texts), progress=False).scores["induction"],
               "ships": safety.ships(model, texts, heads=heads, progress=False).scores}
        if needles is not None:
            out["retrieval"] = retrieval.score(model, needles, progress=False).scores
            out["select_copy"] = select_copy.score(model, mcqa).qk_accuracy
        out["conflict"] = conflict.find_heads(model, pairs, progress=False).effect
        out["probe_log_likelihood"] = probes.score(model, labelled, probes.ProbeConfig(folds=2), progress=False).log_likelihood
        return out

    got = {route: run(model) for route, model in routes.items()}
    for route in ("transformer_lens", "nnsight"):
        for key, want in got["hf"].items():
            torch.testing.assert_close(got[route][key].values, want.values, rtol=0, atol=1e-5, equal_nan=True,
                                       msg=f"{route} {key}")
