"""Each intervention and stat against an independent computation on the materialized attention.

The oracle here is a second attention function registered with transformers that builds the
full attention matrix eagerly and applies each method the way METHODS.md (and, for ACT, the
reference code) writes it: scale-and-renormalize for ZeroTuning, the explicit redistribution
loop for ACT, direct replacement of head outputs for ablation and patching.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import headlab
from tests.conftest import VOCAB

ORACLE = "materialized_oracle"
HOOKS: dict[str, Callable | None] = {"probs": None, "z": None}
CAPTURE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
LOGITS: dict[int, torch.Tensor] = {}  # pre-mask scaled q·k per layer: the QK-score oracle


def materialized_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = module.layer_idx
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    v = value.repeat_interleave(rep, dim=1).float()
    s = query.float() @ k.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    LOGITS[layer] = s.clone()
    Q, K = s.shape[-2:]
    if attention_mask is None:
        allowed = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    else:
        allowed = attention_mask
    a = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # padding rows see nothing
    if HOOKS["probs"] is not None:
        a = HOOKS["probs"](layer, a)
    z = a @ v
    if HOOKS["z"] is not None:
        z = HOOKS["z"](layer, z)
    CAPTURE[layer] = (a.clone(), z.clone())
    return z.transpose(1, 2).to(query.dtype), None


transformers.AttentionInterface.register(ORACLE, materialized_attention)
AttentionMaskInterface.register(ORACLE, sdpa_mask)


@pytest.fixture(scope="module")
def models(llama_dir):
    model = headlab.load_model(llama_dir)
    oracle = transformers.LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation=ORACLE).eval()
    return model, oracle


@pytest.fixture()
def ids():
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))


def run_oracle(oracle, ids, probs=None, z=None):
    HOOKS.update(probs=probs, z=z)
    CAPTURE.clear()
    try:
        with torch.no_grad():
            return oracle(ids).logits
    finally:
        HOOKS.update(probs=None, z=None)


def run_patched(model, ids, plan, stats=None):
    with model.patched(plan, stats) as rec:
        logits = model(ids).logits
    return logits, rec.stats


def on_heads(targets: dict[tuple[int, int], object], fn):
    """Hook that applies fn(tensor_of_one_head, setting) to the listed (layer, head)s."""

    def hook(layer, t):
        t = t.clone()
        for (l, h), setting in targets.items():
            if l == layer:
                t[:, h] = fn(t[:, h], setting)
        return t

    return hook


def test_zerotuning_scales_first_token_and_renormalizes(models, ids):
    model, oracle = models
    gammas = {(0, 1): 3.0, (1, 2): 0.3}

    def zerotune(a, gamma):  # METHODS.md: scale column 0 by γ, renormalize the row
        a = a.clone()
        a[..., 0] *= gamma
        return a / a.sum(-1, keepdim=True)

    expected = run_oracle(oracle, ids, probs=on_heads(gammas, zerotune))
    got, _ = run_patched(model, ids, headlab.InterventionPlan().scale_first_token(gammas))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    baseline = run_oracle(oracle, ids)
    assert (got - baseline).abs().max() > 1e-3  # the intervention really changed the output


def test_key_bias_on_positions(models, ids):
    model, oracle = models
    biases = {(1, 0): 2.0, (1, 3): -1.5}
    positions = [2, 5]

    def biased(a, b):
        w = torch.ones(a.shape[-1])
        w[positions] = math.exp(b)
        a = a * w
        return a / a.sum(-1, keepdim=True)

    expected = run_oracle(oracle, ids, probs=on_heads(biases, biased))
    got, _ = run_patched(model, ids, headlab.InterventionPlan().key_bias(biases, positions))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_output_scale_and_pruning(models, ids):
    model, oracle = models
    scales = {(0, 3): 0.0, (1, 1): 1.7}
    expected = run_oracle(oracle, ids, z=on_heads(scales, lambda z, a: z * a))
    plan = headlab.InterventionPlan().prune_heads([(0, 3)]).scale_heads({(1, 1): 1.7})
    got, _ = run_patched(model, ids, plan)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_zero_and_mean_ablation(models, ids):
    model, oracle = models
    with model.patched(None, headlab.StatsRequest(head_outputs=True)) as ref:
        model(ids)
    means = ref.stats.mean_head_outputs()  # [L, H, D]
    # Independent mean: the oracle's own head outputs, averaged over batch and positions.
    run_oracle(oracle, ids)
    torch.testing.assert_close(means[0, 2], CAPTURE[0][1][:, 2].mean(dim=(0, 1)), atol=1e-5, rtol=1e-5)
    targets = {(1, 0): None, (0, 2): means[0, 2]}

    def ablate(z, mean):
        return torch.zeros_like(z) if mean is None else mean.expand_as(z)

    expected = run_oracle(oracle, ids, z=on_heads(targets, ablate))
    plan = headlab.InterventionPlan().ablate_heads([(1, 0)], "zero").ablate_heads([(0, 2)], "mean", means=means)
    got, _ = run_patched(model, ids, plan)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_output_patching_from_a_cached_run(models, ids):
    model, oracle = models
    corrupted = ids.flip(-1)
    with model.patched(None, headlab.StatsRequest(head_outputs=True)) as cache:
        model(corrupted)
    z = cache.stats.head_outputs  # [L, B, H, Q, D]
    run_oracle(oracle, corrupted)
    cached = {(1, 3): CAPTURE[1][1][:, 3], (0, 0): CAPTURE[0][1][:, 0]}
    expected = run_oracle(oracle, ids, z=on_heads(cached, lambda zh, c: c))
    plan = headlab.InterventionPlan().patch_heads({(1, 3): z[1, :, 3], (0, 0): z[0, :, 0]})
    got, _ = run_patched(model, ids, plan)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def act_reference(a: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """ACT as the reference code does it on one head's [Q, K] map (unpadded causal prefill)."""
    n = a.shape[0]
    r = a.sum(dim=0) / torch.arange(n, 0, -1)
    idx = torch.nonzero(r > tau).flatten()[1:]
    out = a.clone()
    available = a[:, idx].sum(dim=1, keepdim=True) * (1 - beta)
    out[:, idx] *= beta
    copy = a.clone()
    copy[1:, idx] = 0
    ratios = copy / copy.sum(dim=1, keepdim=True)
    return out + available * ratios


def test_act_matches_reference_procedure(models, ids):
    model, oracle = models
    heads = {(0, 1): 0.4, (1, 2): 0.4, (1, 3): 0.4}

    def act(a, beta):  # a: [B, Q, K]
        return torch.stack([act_reference(a[b], beta, 0.1) for b in range(a.shape[0])])

    expected = run_oracle(oracle, ids, probs=on_heads(heads, act))
    plan = headlab.InterventionPlan().act(list(heads), beta=0.4, tau=0.1)
    got, stats = run_patched(model, ids, plan, headlab.StatsRequest(received=True))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    baseline = run_oracle(oracle, ids)
    assert (got - baseline).abs().max() > 1e-3, "no hidden sink found: the test would not exercise ACT"


def test_act_keeps_exactly_beta_on_sinks_not_a_logit_bias(models, ids):
    model, _ = models
    head = (1, 2)
    with model.patched(None, headlab.StatsRequest(received=True)) as base:
        model(ids)
    r = base.stats.received_mean[1, 0, 2]
    sinks = torch.nonzero(r > 0.1).flatten()[1:]
    assert sinks.numel() > 0
    spans = {"sinks": sinks.tolist()}
    with model.patched(None, headlab.StatsRequest(spans=spans)) as before:
        model(ids[:1])
    with model.patched(headlab.InterventionPlan().act([head], beta=0.4), headlab.StatsRequest(spans=spans)) as after:
        model(ids[:1])
    m0, m1 = before.stats.span_mass("sinks")[1, 0, 2], after.stats.span_mass("sinks")[1, 0, 2]
    torch.testing.assert_close(m1, 0.4 * m0, atol=1e-6, rtol=1e-5)


def test_identity_plans(models, ids):
    model, oracle = models
    baseline = run_oracle(oracle, ids)
    plan = (headlab.InterventionPlan().scale_first_token({(0, 0): 1.0, (1, 1): 1.0})
            .act([(0, 1), (1, 2)], beta=1.0).scale_heads({(1, 3): 1.0}))
    got, _ = run_patched(model, ids, plan, headlab.StatsRequest(entropy=True))
    torch.testing.assert_close(got, baseline, atol=1e-5, rtol=1e-5)  # bit-identity: test_reference_kernel


def test_stats_match_materialized_attention(models, ids):
    model, oracle = models
    gammas = {(0, 1): 4.0}
    queries = [3, 10, 19]
    spans = {"first": [0], "window": (4, 9), "scattered": [1, 7, 15]}
    keys = [0, 2, 9, 19]
    request = headlab.StatsRequest(argmax=True, entropy=True, received=True, head_outputs=True, spans=spans, queries=queries,
                                   keys=keys)
    _, stats = run_patched(model, ids, headlab.InterventionPlan().scale_first_token(gammas), request)

    def zerotune(a, gamma):
        a = a.clone()
        a[..., 0] *= gamma
        return a / a.sum(-1, keepdim=True)

    run_oracle(oracle, ids, probs=on_heads(gammas, zerotune))
    for li, layer in enumerate(stats.layers):
        a, z = CAPTURE[layer]
        sel = a[:, :, queries]  # [B, H, Qs, K]
        prob, idx = sel.max(dim=-1)
        assert torch.equal(stats.argmax[li], idx)
        torch.testing.assert_close(stats.argmax_prob[li], prob, atol=1e-6, rtol=1e-5)
        ent = -(sel * sel.clamp_min(1e-30).log()).sum(-1)
        torch.testing.assert_close(stats.entropy[li], ent, atol=1e-5, rtol=1e-5)
        for name, span in spans.items():
            pos = list(range(*span)) if isinstance(span, tuple) else span
            torch.testing.assert_close(stats.span_mass(name)[li], sel[..., pos].sum(-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.received[li], sel.sum(dim=2), atol=1e-6, rtol=1e-5)
        seen = torch.tensor([[float(j <= q) for j in range(a.shape[-1])] for q in queries]).sum(0)
        torch.testing.assert_close(stats.received_count[li], seen.expand_as(stats.received_count[li]))
        torch.testing.assert_close(stats.head_outputs[li], z[:, :, queries], atol=1e-5, rtol=1e-5)
        # keys past a query (19 for query 3) still get their logit; their probability is 0
        torch.testing.assert_close(stats.key_logits[li], LOGITS[layer][:, :, queries][..., keys], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.key_probs[li], sel[..., keys], atol=1e-6, rtol=1e-5)
    assert stats.query_positions.tolist() == queries


def test_stats_window_in_sdpa_fast_path(models, ids):
    """Head outputs alone take the SDPA path; they must equal the reference path's."""
    model, _ = models
    with model.patched(None, headlab.StatsRequest(head_outputs=True, queries=slice(-4, None))) as fast:
        model(ids)
    with model.patched(None, headlab.StatsRequest(head_outputs=True, entropy=True, queries=slice(-4, None))) as ref:
        model(ids)
    torch.testing.assert_close(fast.stats.head_outputs, ref.stats.head_outputs, atol=1e-5, rtol=1e-5)
    assert fast.stats.head_outputs.shape[3] == 4


def test_interventions_apply_at_every_cached_decode_step(models, ids):
    """generate() with a KV cache: ZeroTuning + ACT + pruning at each step, as the oracle does it."""
    model, oracle = models
    gammas = {(0, 1): 3.0}

    def zerotune(a, gamma):
        a = a.clone()
        a[..., 0] *= gamma
        return a / a.sum(-1, keepdim=True)

    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    HOOKS.update(probs=on_heads(gammas, zerotune), z=on_heads({(1, 2): 0.0}, lambda z, a: z * a))
    try:
        with torch.no_grad():
            expected = oracle.generate(ids, **kw)
    finally:
        HOOKS.update(probs=None, z=None)
    plan = headlab.InterventionPlan().scale_first_token(gammas).prune_heads([(1, 2)])
    with model.patched(plan):
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_query_window_stats_on_the_sdpa_path_match_materialized_attention(models, ids):
    """No probability change + a query window: SDPA outputs, reference rows for the window only."""
    model, oracle = models
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    queries = [5, 12, 19]
    spans = {"first": [4], "window": (6, 11)}
    request = headlab.StatsRequest(argmax=True, entropy=True, received=True, head_outputs=True, spans=spans, queries=queries,
                                   keys=[4, 5, 12])
    with model.patched(headlab.InterventionPlan().prune_heads([(0, 3)]), request) as rec:
        got = model(ids, attention_mask=mask).logits
    HOOKS.update(z=on_heads({(0, 3): 0.0}, lambda z, a: z * a))
    CAPTURE.clear()
    try:
        with torch.no_grad():
            expected = oracle(ids, attention_mask=mask).logits
    finally:
        HOOKS.update(z=None)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    stats = rec.stats
    for li, layer in enumerate(stats.layers):
        a, z = CAPTURE[layer]
        sel = a[:, :, queries]
        prob, idx = sel.max(dim=-1)
        assert torch.equal(stats.argmax[li], idx)
        torch.testing.assert_close(stats.argmax_prob[li], prob, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.entropy[li], -(sel * sel.clamp_min(1e-30).log()).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.span_mass("window")[li], sel[..., 6:11].sum(-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.received[li], sel.sum(dim=2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.head_outputs[li], z[:, :, queries], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.key_logits[li], LOGITS[layer][:, :, queries][..., [4, 5, 12]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.key_probs[li], sel[..., [4, 5, 12]], atol=1e-6, rtol=1e-5)
    assert stats.received_count[0, 1, 0, :4].eq(0).all()  # padding keys are seen by no query


def test_a_plan_compiles_once_across_sessions_and_again_after_an_in_place_change(models, ids, monkeypatch):
    """Sessions with the same plan reuse its compiled layers (and the kernel caches they hold):
    compile_layer runs once per layer over two sessions. A plan changed in place — a dict entry,
    or a mean-ablation tensor written into — is compiled afresh, and the outputs follow the change."""
    model, oracle = models
    calls = []
    real = headlab.InterventionPlan.compile_layer
    monkeypatch.setattr(headlab.InterventionPlan, "compile_layer",
                        lambda self, layer, *a: calls.append(layer) or real(self, layer, *a))
    plan = headlab.InterventionPlan().scale_heads({(0, 3): 0.5, (1, 1): 1.7})
    first, _ = run_patched(model, ids, plan)
    second, _ = run_patched(model, ids, plan)
    assert sorted(calls) == [0, 1] and torch.equal(first, second)
    shape = (model.spec.n_heads, model.spec.head_dim, ids.device)
    first_layer = plan.compiled_layers(*shape)[0]
    run_patched(model, ids, plan)
    assert plan.compiled_layers(*shape)[0] is first_layer

    plan.head_scales[(1, 1)] = 0.0  # changed in place: the frozen dataclass's dict is not
    got, _ = run_patched(model, ids, plan)
    expected = run_oracle(oracle, ids, z=on_heads({(0, 3): 0.5, (1, 1): 0.0}, lambda z, a: z * a))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4

    mean_plan = headlab.InterventionPlan().ablate_heads([(0, 2)], "mean", {(0, 2): torch.zeros(model.spec.head_dim)})
    zeroed, _ = run_patched(model, ids, mean_plan)
    mean_plan.means[(0, 2)] += 1.0  # written into: the plan's tensor changed, its compiled layer is stale
    moved, _ = run_patched(model, ids, mean_plan)
    assert (moved - zeroed).abs().max() > 1e-3
    expected = run_oracle(oracle, ids, z=on_heads({(0, 2): None}, lambda z, _: torch.ones_like(z)))
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
