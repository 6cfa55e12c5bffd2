"""kernels/reference.py on raw tensors: GQA ratios, chunking, dtypes, masks, padding rows."""

from __future__ import annotations

import pytest
import torch

from headlab.kernels.reference import patched_attention
from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest


def qkv(B=2, H=8, Hkv=2, Q=37, K=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g) * 2
    k = torch.randn(B, Hkv, K, D, generator=g) * 2
    v = torch.randn(B, Hkv, K, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def dense_attention(q, k, v, allowed):
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = q.float() @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
    a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return a @ vv, a


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
@pytest.mark.parametrize("Q,K", [(37, 37), (1, 53), (5, 29)])  # prefill, decode, chunked prefill
def test_matches_dense_attention(H, Hkv, Q, K):
    q, k, v = qkv(H=H, Hkv=Hkv, Q=Q, K=K)
    allowed = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    expected, _ = dense_attention(q, k, v, allowed)
    out, _ = patched_attention(q, k, v, scaling=16 ** -0.5, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries", [[0, 5, 33, 63], slice(10, 50)], ids=["scattered", "window"])
def test_chunking_does_not_change_results(queries):
    q, k, v = qkv(Q=64, K=64)
    plan = InterventionPlan().scale_first_token({(0, 1): 2.0}).act([(0, 3)], beta=0.4).compile_layer(0, 8, 16)
    request = StatsRequest(argmax=True, entropy=True, received=True, head_outputs=True, spans={"s": (3, 9)},
                           queries=queries).compile(64, 64, torch.device("cpu"))
    whole, st1 = patched_attention(q, k, v, scaling=0.25, plan=plan, stats=request)
    pieces, st2 = patched_attention(q, k, v, scaling=0.25, plan=plan, stats=request, block_elements=2 * 8 * 64 * 3)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)
    for name in ("argmax", "argmax_prob", "entropy", "received", "received_count", "head_outputs"):
        torch.testing.assert_close(getattr(st2, name), getattr(st1, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = qkv(dtype=dtype, Q=41, K=41)
    out, _ = patched_attention(q, k, v, scaling=0.25, is_causal=True)
    assert out.dtype == dtype
    allowed = torch.ones(41, 41, dtype=torch.bool).tril()
    expected, _ = dense_attention(q, k, v, allowed)  # fp32 math on the same low-precision inputs
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_padding_bool_and_additive_masks_and_empty_rows():
    q, k, v = qkv(Q=12, K=12)
    allowed = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    allowed[1, :, :, :4] = False  # left padding of row 1: its first 4 queries see nothing
    request = StatsRequest(argmax=True, entropy=True, received=True).compile(12, 12, torch.device("cpu"))
    out_bool, st = patched_attention(q, k, v, scaling=0.25, attention_mask=allowed, stats=request)
    additive = torch.zeros(2, 1, 12, 12).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out_add, _ = patched_attention(q, k, v, scaling=0.25, attention_mask=additive)
    assert not torch.isnan(out_bool).any()
    assert torch.equal(out_bool[1, :, :4], torch.zeros_like(out_bool[1, :, :4]))  # zeros, not NaN
    torch.testing.assert_close(out_add, out_bool, atol=1e-6, rtol=1e-6)
    expected, _ = dense_attention(q, k, v, allowed)
    torch.testing.assert_close(out_bool, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(st.received_count[1, 0, :4], torch.zeros(4))
    assert not torch.isnan(st.entropy).any()


def test_bidirectional():
    q, k, v = qkv(Q=9, K=9)
    expected, _ = dense_attention(q, k, v, torch.ones(9, 9, dtype=torch.bool))
    out, _ = patched_attention(q, k, v, scaling=0.25, is_causal=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_act_row_entirely_on_sinks_is_left_unchanged():
    # Key 2 takes all the mass of every row that can see it; it is a sink (r > τ) and not the
    # first element of the set, so rows ≥ 2 have no non-sink mass to move it to.
    q, k, v = qkv(B=1, H=1, Hkv=1, Q=6, K=6)
    k = k.clone()
    k[0, 0, 2] = q[0, 0, 2:].mean(0) * 50
    plan = InterventionPlan().act([(0, 0)], beta=0.4, tau=0.1).compile_layer(0, 1, 16)
    out, _ = patched_attention(q, k, v, scaling=0.25, plan=plan)
    ref, _ = patched_attention(q, k, v, scaling=0.25)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[0, 0, 3:], ref[0, 0, 3:], atol=1e-6, rtol=1e-6)


def test_identity_plan_is_bit_identical_to_no_plan():
    q, k, v = qkv(Q=33, K=33)
    plan = (InterventionPlan().scale_first_token({(0, h): 1.0 for h in range(8)}).act([(0, 1), (0, 5)], beta=1.0)
            .scale_heads({(0, 2): 1.0}).compile_layer(0, 8, 16))
    assert plan.has_bias and plan.has_act  # the identity still runs every code path
    with_plan, _ = patched_attention(q, k, v, scaling=0.25, plan=plan)
    without, _ = patched_attention(q, k, v, scaling=0.25)
    assert torch.equal(with_plan, without)


def test_stats_only_mode_reads_no_values():
    q, k, v = qkv(Q=20, K=20)
    request = StatsRequest(argmax=True, entropy=True).compile(20, 20, torch.device("cpu"))
    out, st = patched_attention(q, k, v[..., :0], scaling=0.25, stats=request, compute_output=False)
    _, full = patched_attention(q, k, v, scaling=0.25, stats=request)
    assert out is None
    assert torch.equal(st.argmax, full.argmax) and torch.equal(st.entropy, full.entropy)


def test_explicit_query_positions_for_a_subset_of_rows():
    q, k, v = qkv(Q=30, K=30)
    request = StatsRequest(argmax=True, entropy=True).compile(30, 30, torch.device("cpu"))
    _, full = patched_attention(q, k, v, scaling=0.25, stats=request)
    rows = torch.tensor([4, 17, 29])
    sub = StatsRequest(argmax=True, entropy=True).compile(3, 30, torch.device("cpu"))
    _, part = patched_attention(q[:, :, rows], k, v, scaling=0.25, stats=sub, query_positions=rows)
    assert torch.equal(part.argmax, full.argmax[:, :, rows])
    torch.testing.assert_close(part.entropy, full.entropy[:, :, rows])
    assert part.query_positions.tolist() == [4, 17, 29]
    _, window = patched_attention(q[:, :, 10:20], k, v, scaling=0.25,
                                  stats=StatsRequest(argmax=True).compile(10, 30, torch.device("cpu")), query_positions=10)
    assert torch.equal(window.argmax, full.argmax[:, :, 10:20]) and window.query_positions.tolist() == list(range(10, 20))
