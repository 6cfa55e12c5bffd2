"""Key-bias plans on plain attention + the exact sparse correction (`headlab.kernels.score_mod`).

The correction is exact algebra; these tests hold it to the reference on the CPU — the formula on
random tensors (GQA, causal prefill, decode against a cache, several biased keys, head-specific
biases), and the whole model path with the route switched on (ZeroTuning / first-token-bias plans
with head scales and ablations, in prefill and in cached generation). The GPU run
(`benchmarks/score_mod_bench.py`) repeats the parity at CUDA shapes in bf16 and measures the speed.
"""

from __future__ import annotations

import math

import pytest
import torch

import headlab
from headlab.kernels import reference_attention, score_mod
from headlab.plan import InterventionPlan


def _plan(layer_bias: dict, n_heads: int, positions=(0,)):
    plan = InterventionPlan().key_bias(layer_bias, list(positions))
    return plan.compile_layer(0, n_heads, 16)


@pytest.mark.parametrize("q_len, k_len, positions", [(12, 12, (0,)), (12, 12, (0, 3, 7)), (1, 20, (0, 5)), (1, 20, (19,))])
def test_the_correction_equals_the_reference(q_len, k_len, positions):
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, H, q_len, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, k_len, D, dtype=torch.float64), torch.randn(B, Hkv, k_len, D, dtype=torch.float64)
    biases = {(0, 0): math.log(1.5), (0, 1): math.log(0.6), (0, 3): math.log(4.0)}
    plan = _plan(biases, H, positions)
    assert score_mod.route_reason(plan, q_len, k_len, None, True, None, False) is None
    expect, _ = reference_attention(q, k, v, scaling=D ** -0.5, is_causal=True, plan=plan)
    # the plain attention's output and log-sum-exp, computed exactly here
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * D ** -0.5
    visible = torch.arange(k_len)[None, :] <= (torch.arange(q_len) + k_len - q_len)[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vv
    got = score_mod.apply_sparse_bias(out, lse, q, k, v, plan.bias_positions, plan.bias, D ** -0.5, k_len - q_len, True)
    torch.testing.assert_close(got.double(), expect.double(), atol=1e-5, rtol=1e-5)


def test_attention_with_lse_on_the_cpu_matches_logsumexp():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    out, lse = score_mod.attention_with_lse(q, k, v, 0.25, True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ({"mask": True}, "an attention mask"),
    ({"q_len": 4}, "a chunked prefill"),
    ({"softcap": 30.0}, "soft-capped logits"),
    ({"probabilities": True}, "probability stats"),
    ({"gamma": 0.3}, "outside"),
])
def test_the_route_is_refused_where_the_correction_does_not_hold(case, reason):
    plan = _plan({(0, 0): math.log(case.get("gamma", 1.5))}, 4)
    mask = torch.ones(1, 1, case.get("q_len", 12), 12, dtype=torch.bool) if case.get("mask") else None
    why = score_mod.route_reason(plan, case.get("q_len", 12), 12, mask, True, case.get("softcap"),
                                 case.get("probabilities", False))
    assert why is not None and reason in why
    act = InterventionPlan().first_token_bias({(0, 0): 0.5}).act([(0, 1)]).compile_layer(0, 4, 16)
    assert "ACT" in score_mod.route_reason(act, 12, 12, None, True, None, False)


def test_model_path_with_the_route_equals_the_reference(monkeypatch):
    """The whole model: ZeroTuning γ, a first-token bias, a head scale and a mean... zero ablation
    in one plan, prefill and cached generation, routed vs the exact reference."""
    model = headlab.load_model("zoo:pycode-llama")
    ids = model.tokenize('VALUE = "alpha"\nprint(VALUE)\nassert VALUE == "')["input_ids"]
    plan = (InterventionPlan().scale_first_token({(5, 5): 1.8, (2, 4): 0.7, (3, 1): 3.0})
            .first_token_bias({(4, 2): 0.4}).scale_heads({(5, 4): 1.3}).prune_heads([(1, 0)]))
    with model.patched(plan):
        expect = model(ids).logits
        expect_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    calls = []
    original = score_mod.attend

    def counted(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(score_mod, "enabled", lambda query: True)
    monkeypatch.setattr(score_mod, "attend", counted)
    with model.patched(plan):
        got = model(ids).logits
        got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert len(calls) >= 4 * 7  # four biased layers, prefill and every decode step
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=1e-4)
    assert torch.equal(got_gen, expect_gen)
    with model.patched(InterventionPlan()):
        plain = model(ids).logits
    assert (expect - plain).abs().max() > 0.05  # the plan matters: the parity is not vacuous


@pytest.mark.parametrize("q_len, k_len, dtype", [(20, 20, torch.float32), (20, 20, torch.bfloat16), (1, 37, torch.bfloat16)])
def test_the_triton_correction_equals_the_pytorch_one(q_len, k_len, dtype):
    """The CUDA route's kernel (`_correct`, here in Triton's interpreter) against `apply_sparse_bias`:
    bias on three keys, GQA, causal prefill and decode, the head scale applied in the kernel."""
    if not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    torch.manual_seed(2)
    B, H, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, q_len, H, D).to(dtype).transpose(1, 2)  # HF layout: a strided view
    k, v = torch.randn(B, Hkv, k_len, D).to(dtype), torch.randn(B, Hkv, k_len, D).to(dtype)
    plan = (InterventionPlan().key_bias({(0, 0): math.log(1.5), (0, 2): math.log(0.7), (0, 3): 2.0}, [0, 4, 9])
            .scale_heads({(0, 1): 1.25, (0, 3): 0.5}).compile_layer(0, H, D))
    out, lse = score_mod.attention_with_lse(q.float(), k.float(), v.float(), D ** -0.5, q_len == k_len)
    out = out.to(dtype)
    expect = score_mod.apply_sparse_bias(out, lse, q, k, v, plan.bias_positions, plan.bias, D ** -0.5, k_len - q_len, True)
    expect = expect * plan.head_scale[None, :, None, None]
    got = score_mod.correct(out.clone(), lse, q, k, v, plan, D ** -0.5, k_len - q_len, True, head_scale=True)
    assert got.dtype == dtype and got.shape == (B, H, q_len, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expect.to(dtype).float(), atol=tol, rtol=tol)
    unscaled = score_mod.correct(out, lse, q, k, v, plan, D ** -0.5, k_len - q_len, True, head_scale=False)
    assert unscaled.dtype == torch.float32
    torch.testing.assert_close(unscaled * plan.head_scale[None, :, None, None], expect, atol=tol, rtol=tol)
    # a plan that changes heads 0 and 3 only: those are rewritten in the attention's own output,
    # heads 1 and 2 are not touched (their plain output is final)
    sparse = (InterventionPlan().key_bias({(0, 0): math.log(1.5)}, [0, 4]).scale_heads({(0, 3): 0.5})
              .compile_layer(0, H, D))
    assert sparse.biased_or_scaled_heads == (0, 3)
    expect = score_mod.apply_sparse_bias(out, lse, q, k, v, sparse.bias_positions, sparse.bias, D ** -0.5, k_len - q_len,
                                         True) * sparse.head_scale[None, :, None, None]
    mine = out.clone()
    got = score_mod.correct(mine, lse, q, k, v, sparse, D ** -0.5, k_len - q_len, True, head_scale=True)
    assert got.data_ptr() == mine.data_ptr()
    assert torch.equal(got[:, 1:3], out[:, 1:3])
    assert (got[:, 0] != out[:, 0]).any() and (got[:, 3] != out[:, 3]).any()
    torch.testing.assert_close(got.float(), expect.to(dtype).float(), atol=tol, rtol=tol)


def test_a_short_decode_step_is_one_masked_sdpa_call():
    """Decode over a cache up to DECODE_MASK_MAX_KEYS: the bias as an additive mask, GQA rows
    stacked, the head scale applied; the cached bias row grows with the cache."""
    torch.manual_seed(4)
    B, H, Hkv, D = 2, 4, 2, 16
    plan = (InterventionPlan().key_bias({(0, 0): math.log(1.5), (0, 2): -0.3, (0, 3): 2.0}, [0, 4, 9])
            .scale_heads({(0, 1): 1.25}).compile_layer(0, H, D))
    for K in (12, 1500):  # the second grows the cached row past its first 1024 slots (both under the threshold)
        q = torch.randn(B, 1, H, D).transpose(1, 2)
        k, v = torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
        expect, _ = reference_attention(q, k, v, scaling=D ** -0.5, is_causal=True, plan=plan)
        got, scaled = score_mod.attend(q, k, v, plan, D ** -0.5, True)
        assert scaled and K <= score_mod.DECODE_MASK_MAX_KEYS
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert plan._kernel_cache[("decode_bias", torch.float32, q.device)].shape[-1] == 2048


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a GPU (the GPU run of benchmarks/score_mod_bench.py records this)")
@pytest.mark.parametrize("n_q, n_k", [(1024, 1024), (1, 3000), (1, 6000)])
def test_the_cuda_route_matches_the_reference_at_cuda_shapes(n_q, n_k):
    """bf16 at Llama-3-8B attention shapes: prefill (cuDNN + the Triton correction), a short decode
    (masked SDPA) and a long one (FlashAttention + correction), against the fp32 reference."""
    torch.manual_seed(0)
    H, Hkv, D = 32, 8, 128
    q = torch.randn(1, n_q, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, Hkv, n_k, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, n_k, D, device="cuda", dtype=torch.bfloat16)
    plan = (InterventionPlan().scale_first_token({(0, h): 1.5 for h in range(0, H, 4)}).scale_heads({(0, 1): 1.2})
            .compile_layer(0, H, D).to("cuda"))
    assert score_mod.enabled(q) and score_mod.route_reason(plan, n_q, n_k, None, True, None, False) is None
    expect, _ = reference_attention(q.float(), k.float(), v.float(), scaling=D ** -0.5, is_causal=True, plan=plan)
    got, scaled = score_mod.attend(q, k, v, plan, D ** -0.5, True)
    assert scaled and got.dtype == torch.bfloat16
    plain, _ = reference_attention(q.float(), k.float(), v.float(), scaling=D ** -0.5, is_causal=True)
    assert (expect - plain).abs().max() > 0.002  # the plan moves the outputs (less, the more keys share the row)
    assert (got.float() - expect).abs().max() < 0.02


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_the_cuda_route_in_a_model_matches_the_reference(monkeypatch):
    """zoo:pycode-llama on the GPU in bf16 (head_dim 48: the PyTorch correction): a ZeroTuning plan
    through the route (cuDNN + correction in prefill, masked SDPA in decode) gives the greedy
    tokens and, within bf16 rounding, the logits of HEADLAB_KERNEL=reference; fp32 keeps the reference."""
    model = headlab.load_model("zoo:pycode-llama", device="cuda", dtype=torch.bfloat16)
    ids = model.tokenize('VALUE = "alpha"\nprint(VALUE)\nassert VALUE == "')["input_ids"].to("cuda")
    plan = InterventionPlan().scale_first_token({(5, 5): 1.8, (2, 4): 0.7, (3, 1): 3.0}).scale_heads({(5, 4): 1.3})
    calls = []
    original = score_mod.attend
    monkeypatch.setattr(score_mod, "attend", lambda *a, **k: calls.append(1) or original(*a, **k))
    with model.patched(plan):
        got = model(ids).logits.float()
        got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert len(calls) >= 3 * 7
    monkeypatch.setenv("HEADLAB_KERNEL", "reference")
    with model.patched(plan):
        expect = model(ids).logits.float()
        expect_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert (got - expect).abs().max() < 0.25 and (got - expect).abs().mean() < 0.02
    assert torch.equal(got_gen, expect_gen)
    assert not score_mod.enabled(torch.zeros(1, device="cuda"))  # fp32 tensors keep the exact reference


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_properties(0).total_memory < 60 * 2 ** 30,
                    reason="needs a GPU with 60 GB (tensors of over 2^31 elements)")
@pytest.mark.parametrize("subset", [True, False], ids=["in_place", "new_buffer"])
def test_the_correction_reaches_rows_past_2_31_elements(subset):
    """The correction kernels' offsets are int64: with B·Q·H·D > 2^31 (a third batch row of 256k
    tokens at 32 × 128 in HF's [B, Q, H, D] memory, whose first element sits at 2^31), the last rows
    of that batch row equal the same correction run on those rows alone. In int32 the offsets
    wrapped to other memory."""
    B, Q, H, Hkv, D = 3, 1 << 18, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Q, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    out = torch.randn(B, Q, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(B, Hkv, 64, D, device="cuda", dtype=torch.bfloat16, generator=g)  # key 0 is the biased one
    lse = torch.randn(B, H, Q, device="cuda", generator=g) + 8.0
    plan = (InterventionPlan().scale_first_token({(0, h): 1.5 for h in range(0, H, 4)}).scale_heads({(0, 1): 1.2})
            .compile_layer(0, H, D).to("cuda"))
    rows = slice(Q - 64, Q)
    before = out[2:, :, rows].contiguous()
    # the same rows alone (non-causal: every row sees the 64 keys, key 0 the biased one)
    expect = score_mod.correct(before.clone(), lse[2:, :, rows], q[2:, :, rows].contiguous(), k[2:], k[2:],
                               plan, D ** -0.5, 0, False, head_scale=True)
    big = out if subset else out.float()  # float: a new buffer is written instead of out in place
    got = score_mod.correct(big, lse, q, k, k, plan, D ** -0.5, 0, False, head_scale=True)
    torch.testing.assert_close(got[2:, :, rows].float(), expect.float(), atol=0, rtol=0)
    assert (expect.float() - before.float()).abs().max() > 0.01  # the correction changed these rows
