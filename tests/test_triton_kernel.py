"""Triton patched attention vs the exact reference: outputs, every intervention, every stat.

Without a GPU these run through Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1) on
small shapes; on a GPU the same tests run on CUDA tensors at larger shapes. The reference runs on
the same (rounded) fp16/bf16 inputs in fp32, so the differences measured are the kernel's own.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from headlab.kernels import (
    KernelUnavailableError,
    active_kernel,
    kernel_choice,
    uses_triton,
)
from headlab.kernels.fused import interpreting, patched_attention, unsupported_reason
from headlab.kernels.reference import patched_attention as reference

from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
if not GPU and not interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

D_SMALL = 64 if GPU else 16
# (queries, keys): prefill, decode (split keys + combine), chunked prefill, several blocks
SHAPES = [(300, 300), (1, 2000), (7, 1500), (1000, 1111)] if GPU else [(37, 37), (1, 53), (5, 80), (70, 70)]


def qkv(B=2, H=8, Hkv=2, Q=37, K=37, D=D_SMALL, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, K, D, generator=g) * 1.5
    v = torch.randn(B, Hkv, K, D, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def both(q, k, v, plan=None, stats=None, **kw):
    """(kernel result, reference result) of one call, the plan compiled for layer 0."""
    H, D = q.shape[1], q.shape[-1]
    lp = plan.compile_layer(0, H, D) if plan is not None else None
    cs = stats.compile(q.shape[2], k.shape[2], DEVICE) if stats is not None else None
    kw.setdefault("scaling", D ** -0.5)
    assert unsupported_reason(q, k, v, kw.get("attention_mask"), cs, kw.get("query_positions")) is None
    return patched_attention(q, k, v, plan=lp, stats=cs, **kw), reference(q, k, v, plan=lp, stats=cs, **kw)


def close_out(got, want, dtype):
    assert not torch.isnan(got).any()
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)
    assert err < (1.5e-2 if dtype == torch.bfloat16 else 3e-3), float(err)
    torch.testing.assert_close(got.float(), want.float(), atol=6e-2 if dtype == torch.bfloat16 else 1e-2, rtol=0)


def close_stats(got, want, atol=2e-3):
    for name in ("argmax_prob", "entropy", "received", "received_count", "key_logits", "key_probs", "head_outputs"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            tol = 3e-2 if name == "head_outputs" else atol * (10 if name == "entropy" else 1)
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=1e-3, msg=name)
    assert got.span_mass.keys() == want.span_mass.keys()
    for name in want.span_mass:
        torch.testing.assert_close(got.span_mass[name], want.span_mass[name], atol=atol, rtol=1e-3, msg=name)
    torch.testing.assert_close(got.query_positions, want.query_positions)
    if want.argmax is not None:
        assert got.argmax.dtype == torch.long
        same = got.argmax == want.argmax
        # where the kernel picked another key it must be a near-tie: the same top probability
        torch.testing.assert_close(got.argmax_prob[~same], want.argmax_prob[~same], atol=atol, rtol=0)
        assert same.float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Q,K", SHAPES)
@pytest.mark.parametrize("Hkv", [8, 2, 1], ids=["gqa1", "gqa4", "gqa8"])
def test_outputs_match_reference(Hkv, Q, K, dtype):
    q, k, v = qkv(Hkv=Hkv, Q=Q, K=K, dtype=dtype, seed=Q + K + Hkv)
    (out, _), (ref, _) = both(q, k, v)
    assert out.dtype == dtype and out.shape == ref.shape
    close_out(out, ref, dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_head_dims_64_and_128(D):
    Q, K = (500, 700) if GPU else (20, 40)
    q, k, v = qkv(Q=Q, K=K, D=D, dtype=torch.bfloat16)
    (out, _), (ref, _) = both(q, k, v, InterventionPlan().scale_first_token({(0, 1): 3.0}))
    close_out(out, ref, torch.bfloat16)


def test_unsupported_calls_name_their_reason():
    q, k, v = qkv()
    q24, k24, v24 = qkv(D=24)
    assert "head_dim 24" in unsupported_reason(q24, k24, v24, None, None, None)
    assert "dtype torch.float64" in unsupported_reason(q.double(), k.double(), v.double(), None, None, None)
    assert "non-consecutive" in unsupported_reason(q, k, v, None, None, torch.tensor([0, 2, 5]))


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_padding_masks_and_fully_masked_rows(kind, decode):
    """Left padding: padded keys masked; padded query rows see no key and must give zeros, not NaN."""
    B, Q, K = 3, (1 if decode else 40), 64 if not GPU else 900
    q, k, v = qkv(B=B, Q=Q, K=K)
    pad = torch.tensor([0, 5, 17])
    key_ok = torch.arange(K)[None, :] >= pad[:, None]  # [B, K]
    qpos = torch.arange(K - Q, K)
    allowed = key_ok[:, None, :] & (torch.arange(K)[None, None, :] <= qpos[None, :, None])
    allowed = allowed & (qpos[None, :, None] >= pad[:, None, None])  # padded queries see nothing
    if decode:
        allowed[2] = False  # a row with no visible key at all
    mask = allowed[:, None].to(DEVICE)
    if kind == "float":
        mask = torch.zeros(mask.shape, device=DEVICE, dtype=torch.float16).masked_fill(~mask, torch.finfo(torch.float16).min)
    req = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 8)}, received=True)
    (out, st), (ref, rst) = both(q, k, v, stats=req, attention_mask=mask)
    close_out(out, ref, torch.float16)
    dead = ~allowed.any(-1)  # [B, Q]
    if dead.any():
        assert torch.equal(out.float().permute(0, 2, 1, 3)[dead.to(DEVICE)], torch.zeros_like(out.float().permute(0, 2, 1, 3)[dead.to(DEVICE)]))
        assert (st.entropy.permute(0, 2, 1)[dead.to(DEVICE)] == 0).all()
    close_stats(st, rst)


PLANS = {
    "head_scale": InterventionPlan().scale_heads({(0, 1): 1.7, (0, 6): 0.5}),
    "prune": InterventionPlan().prune_heads([(0, 0), (0, 5)]),
    "zerotuning": InterventionPlan().scale_first_token({(0, 2): 4.0, (0, 3): 0.25}),
    "key_bias": InterventionPlan().key_bias({(0, 1): 1.5, (0, 7): -2.0}, [0, 3, 30]),
    "logit_scale": InterventionPlan().scale_logits({(0, 4): 0.3}).uniform_attention([(0, 5)], epsilon=0.0),
    "zero_ablation": InterventionPlan().ablate_heads([(0, 2)], "zero"),
    "mean_ablation": "mean",
    "patch": "patch",
    "shift": "shift",
    "shift_and_scale": "shift_and_scale",
    "act": InterventionPlan().act([(0, 1), (0, 2), (0, 6)], beta=0.3, tau=0.02),
    "act_beta0": InterventionPlan().act([(0, 3)], beta=0.0, tau=0.02),
    "act_calibrated": InterventionPlan().act_with_sinks({(0, 1): [0, 3], (0, 4): [2, 7, 500]}, beta=0.3)
    .act([(0, 6)], beta=0.4, tau=0.02),
    "combined": InterventionPlan().scale_first_token({(0, 2): 2.0}).act([(0, 1)], beta=0.4, tau=0.02)
    .scale_heads({(0, 1): 1.3}).scale_logits({(0, 6): 0.5}),
}


def _plan(name, q):
    plan = PLANS[name]
    D = q.shape[-1]
    g = torch.Generator().manual_seed(3)
    if plan == "mean":
        return InterventionPlan().ablate_heads([(0, 3)], "mean", means={(0, 3): torch.randn(D, generator=g)})
    if plan == "patch":
        return InterventionPlan().patch_heads({(0, 4): torch.randn(q.shape[0], q.shape[2], D, generator=g)})
    if plan == "shift":  # ITI: z += v
        return InterventionPlan().shift_heads({(0, 2): torch.randn(D, generator=g), (0, 5): torch.randn(D, generator=g)})
    if plan == "shift_and_scale":  # the shift comes before the output scale
        return InterventionPlan().shift_heads({(0, 1): torch.randn(D, generator=g)}).scale_heads({(0, 1): 1.5, (0, 3): 0.0})
    return plan


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", list(PLANS))
def test_every_intervention_matches_reference(name, shape):
    Q, K = shape
    q, k, v = qkv(Q=Q, K=K, dtype=torch.bfloat16, seed=len(name))
    # a planted sink: key 0 gets large logits for every query, as in trained models
    k[:, :, 0] = q.mean(dim=(1, 2))[:, None].to(k.dtype) * 3
    plan = _plan(name, q)
    req = StatsRequest(argmax=True, entropy=True, spans={"sink": (0, 1), "late": (K // 2, K)}, received=True,
                       head_outputs=True)
    (out, st), (ref, rst) = both(q, k, v, plan, req)
    close_out(out, ref, torch.bfloat16)
    close_stats(st, rst)


def test_softcap_matches_reference():
    q, k, v = qkv(Q=SHAPES[0][0], K=SHAPES[0][1], dtype=torch.bfloat16)
    req = StatsRequest(argmax=True, entropy=True, keys=[0, 3])
    (out, st), (ref, rst) = both(q, k, v, InterventionPlan().scale_first_token({(0, 1): 2.0}), req, softcap=5.0)
    close_out(out, ref, torch.bfloat16)
    close_stats(st, rst)


def test_act_moves_sink_mass_like_the_reference():
    """ACT through the kernel: a non-initial sink keeps β of its attention (key 0, the initial sink,
    is kept as ACT does), other heads are untouched, and the stats see the calibrated rows."""
    Q, K = SHAPES[0]
    q, k, v = qkv(Q=Q, K=K, seed=11)
    D = q.shape[-1]
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(1)), dim=0).to(DEVICE) * D ** 0.5
    q += u.to(q.dtype)  # every query shares a direction that the two sink keys point along: logit ≈ 6
    k[:, :, 0] = k[:, :, 7] = (u * 6 / D ** 0.5).to(k.dtype)
    req = StatsRequest(spans={"first": (0, 1), "sink": (7, 8)})
    (_, before), _ = both(q, k, v, None, req)
    (_, after), (_, ref_after) = both(q, k, v, InterventionPlan().act([(0, 1)], beta=0.25, tau=0.05), req)
    sink_before, sink_after = before.span_mass["sink"], after.span_mass["sink"]
    assert sink_before[:, 1, 7:].mean() > 0.1  # the planted key is a sink
    torch.testing.assert_close(sink_after[:, 1, 7:], 0.25 * sink_before[:, 1, 7:], atol=2e-3, rtol=1e-2)
    assert (after.span_mass["first"][:, 1, 7:] > before.span_mass["first"][:, 1, 7:]).all()  # got some of the mass
    torch.testing.assert_close(sink_after[:, 0], sink_before[:, 0])  # other heads untouched
    torch.testing.assert_close(sink_after, ref_after.span_mass["sink"], atol=2e-3, rtol=1e-3)


WINDOWS = {"all": None, "last8": slice(-8, None), "scattered": [0, 5, 33], "one": [-1]}


@pytest.mark.parametrize("compute_output", [True, False], ids=["with_output", "stats_only"])
@pytest.mark.parametrize("window", list(WINDOWS))
def test_every_stat_on_query_windows(window, compute_output):
    Q, K = (SHAPES[0][0], SHAPES[0][1])
    q, k, v = qkv(Q=Q, K=K, Hkv=4, dtype=torch.float16, seed=5)
    req = StatsRequest(argmax=True, entropy=True, spans={"a": (0, 5), "b": [3, 9, 20], "empty": []}, received=True,
                       head_outputs=compute_output, keys=[2, 7, 11], queries=WINDOWS[window])
    plan = InterventionPlan().scale_first_token({(0, 1): 3.0})
    (out, st), (ref, rst) = both(q, k, v, plan, req, compute_output=compute_output)
    if compute_output:
        close_out(out, ref, torch.float16)
    else:
        assert out is None and ref is None
    close_stats(st, rst)


def test_decode_split_stats_combine_exactly():
    """Few queries, many keys: key splits merged by the combine kernel, stats included."""
    Q, K = SHAPES[2]
    q, k, v = qkv(Q=Q, K=K, Hkv=1, seed=9)
    req = StatsRequest(argmax=True, entropy=True, spans={"a": (0, K // 3), "b": list(range(1, K, 7))}, keys=[1, K - 1])
    (out, st), (ref, rst) = both(q, k, v, InterventionPlan().scale_first_token({(0, 0): 0.5}), req)
    close_out(out, ref, torch.float16)
    close_stats(st, rst)
    total = st.span_mass["a"] + sum(st.key_probs.unbind(-1))  # masses are probabilities
    assert ((total >= 0) & (total <= 1 + 1e-3)).all()


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain_logits", "key_bias"])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_key_set_masses_gathered_or_in_the_loop(kind, with_bias, monkeypatch):
    """Sparse key sets are measured after the loop from their own keys (gathered 16 at a time), dense
    ones in every key block; both equal the reference under the causal mask, with plain logits (the
    scale folded into exp2) and with a key bias, and the gathered masses equal the in-loop ones."""
    from headlab.kernels import fused

    Q, K = SHAPES[3]  # a prefill over several row and key blocks
    q, k, v = qkv(Q=Q, K=K, dtype=torch.bfloat16, seed=21)
    spans = {"first": (0, 2), "needles": [5, K // 2, K - 1]} if kind == "sparse" else {"late": (2, K)}
    req = StatsRequest(argmax=True, entropy=True, spans=spans, keys=[3, K // 2])
    sets = fused.KeySets(req.compile(Q, K, DEVICE), list(spans), K, DEVICE)
    assert sets.sparse == (kind == "sparse")
    if kind == "sparse":  # each set's keys once, ascending, then padding with K (no key)
        assert sets.keys.tolist() == [0, 1, 3, 5, K // 2, K - 1] + [K] * 10
    plan = InterventionPlan().scale_first_token({(0, 1): 3.0, (0, 5): 0.2}) if with_bias else None
    (out, st), (ref, rst) = both(q, k, v, plan, req)
    close_out(out, ref, torch.bfloat16)
    close_stats(st, rst)
    monkeypatch.setattr(fused, "SPAN_POST", False)  # every set in the loop
    _, st_loop = patched_attention(q, k, v, plan=plan.compile_layer(0, q.shape[1], q.shape[-1]) if plan else None,
                                   stats=req.compile(Q, K, DEVICE), scaling=q.shape[-1] ** -0.5)
    for name in spans:
        torch.testing.assert_close(st.span_mass[name], st_loop.span_mass[name], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(st.key_probs, st_loop.key_probs, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", ["hf_views", "contiguous", "unaligned"])
def test_key_value_blocks_through_descriptors_or_pointers(layout, monkeypatch):
    """The prefill pass reads its unmasked key / value blocks through tensor descriptors where the
    layout allows (HF's [B, K, Hkv, D] views and contiguous tensors) and through pointers otherwise
    (a base off a 16-byte boundary); either way, with a key bias and every stat, the results equal
    the reference and the pointer path's."""
    from headlab.kernels import fused

    Q, K = SHAPES[3]
    q, k, v = qkv(Q=Q, K=K, dtype=torch.bfloat16, seed=31)
    if layout == "hf_views":
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    elif layout == "unaligned":  # one element in: the base is 2 bytes past a 16-byte boundary
        k, v = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (k, v))
    if GPU and fused._capability(k.device)[0] < 9:
        pytest.skip("tensor descriptors need Hopper")
    assert (fused._kv_descriptors(k, v, 16) is None) == (layout == "unaligned")
    plan = InterventionPlan().scale_first_token({(0, 1): 3.0}).scale_heads({(0, 2): 0.5})
    req = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 2), "late": (K // 2, K)})
    (out, st), (ref, rst) = both(q, k, v, plan, req)
    close_out(out, ref, torch.bfloat16)
    close_stats(st, rst)
    monkeypatch.setattr(fused, "KV_DESC", False)
    lp = plan.compile_layer(0, q.shape[1], q.shape[-1])
    out_p, st_p = patched_attention(q, k, v, plan=lp, stats=req.compile(Q, K, DEVICE), scaling=q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, out_p, atol=0, rtol=0)
    torch.testing.assert_close(st.entropy, st_p.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(st.argmax, st_p.argmax)


def test_argmax_ties_go_to_the_first_key():
    """The argmax of a plain-logit prefill (the scale folded into exp2, the first column equal to each
    block's max): equal keys (3 and 5, which most rows prefer) resolve to the leftmost, as torch's
    argmax does, and every row matches the reference."""
    Q, K = SHAPES[3]
    q, k, v = qkv(Q=Q, K=K, dtype=torch.bfloat16, seed=23)
    D = q.shape[-1]
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(2)), dim=0).to(DEVICE)
    q += (u * D ** 0.5).to(q.dtype)  # every query shares a direction...
    k[:, :, 3] = (u * 3 * D ** 0.5).to(k.dtype)  # ...that key 3 points along: most rows prefer it...
    k[:, :, 5] = k[:, :, 3]  # ...and its twin
    req = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 1)})
    (out, st), (ref, rst) = both(q, k, v, None, req)
    close_out(out, ref, torch.bfloat16)
    close_stats(st, rst)
    rows = torch.arange(Q, device=DEVICE) + K - Q >= 5  # rows that see both twins
    picked = st.argmax[:, :, rows]
    assert (picked == 3).float().mean() > 0.5 and not (picked == 5).any()


def test_query_positions_offset_rows():
    """Rows that are not the last Q positions (a window of a prefill) align by query_positions."""
    q, k, v = qkv(Q=SHAPES[0][0], K=SHAPES[0][1])
    rows = slice(4, 12)
    (out, st), (ref, rst) = both(q[:, :, rows].contiguous(), k, v, stats=StatsRequest(argmax=True, entropy=True),
                                 query_positions=4)
    close_out(out, ref, torch.float16)
    close_stats(st, rst)


def test_dispatch_choice(monkeypatch):
    q, k, v = qkv()
    monkeypatch.delenv("HEADLAB_KERNEL", raising=False)
    assert kernel_choice() == "auto"
    assert uses_triton(q, k, v) == GPU  # auto: CPU tensors go to the reference
    monkeypatch.setenv("HEADLAB_KERNEL", "triton")
    assert uses_triton(q, k, v)
    assert active_kernel(DEVICE).startswith("triton")
    with pytest.raises(KernelUnavailableError, match="head_dim 24"):
        uses_triton(*qkv(D=24))
    monkeypatch.setenv("HEADLAB_KERNEL", "reference")
    assert not uses_triton(q, k, v) and "reference" in active_kernel(DEVICE)
    monkeypatch.setenv("HEADLAB_KERNEL", "fast")
    with pytest.raises(ValueError, match="choose one of auto, reference, triton"):
        kernel_choice()


def test_model_forward_and_generate_through_the_kernels(tiny_dirs, monkeypatch):
    """A whole model (tiny Llama, GQA 2, fp16) with a plan and stats: Triton kernels == reference."""
    from headlab import load_model

    model = load_model(tiny_dirs("llama"), dtype=torch.float16, device=DEVICE)
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    plan = InterventionPlan().scale_first_token({(1, 2): 3.0}).prune_heads([(0, 1)])
    req = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 1)}, queries=slice(-4, None))
    results = {}
    for kernel in ("reference", "triton"):
        monkeypatch.setenv("HEADLAB_KERNEL", kernel)
        with torch.no_grad(), model.patched(plan, req) as rec:
            logits = model.model(input_ids=ids).logits.float()
        results[kernel] = (logits, rec.stats.entropy, rec.stats.span_mass("first"))
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=1e-2)
    assert math.isfinite(float(results["triton"][0].sum()))


def test_padded_cached_generation_through_the_kernels(tiny_dirs, monkeypatch):
    """Left-padded batch, KV-cache decode with a plan and per-step stats: same tokens and stats as the reference."""
    from headlab import load_model

    model = load_model(tiny_dirs("llama"), dtype=torch.float16, device=DEVICE, load_tokenizer=False)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second prompt is 7 tokens shorter: left padding
    ids[1, :7] = 0
    plan = InterventionPlan().scale_first_token({(0, 1): 2.5}).scale_heads({(1, 3): 1.4})
    req = StatsRequest(argmax=True, entropy=True, queries=slice(-1, None))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    results = {}
    for kernel in ("reference", "triton"):
        monkeypatch.setenv("HEADLAB_KERNEL", kernel)
        with model.patched(plan, req) as rec:
            out = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), **kw)
        results[kernel] = (out, rec.stats.argmax, rec.stats.entropy)
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert results["triton"][1].shape[-1] == 5  # the prefill's last row, then one per forward of a new token
    assert (results["triton"][1] == results["reference"][1]).float().mean() > 0.97
    torch.testing.assert_close(results["triton"][2], results["reference"][2], atol=2e-2, rtol=1e-2)


def test_plan_beyond_the_keys_is_a_plan_error():
    from headlab.errors import PlanError

    q, k, v = qkv(Q=5, K=20)
    lp = InterventionPlan().key_bias({(0, 1): 1.0}, [25]).compile_layer(0, 8, q.shape[-1])
    with pytest.raises(PlanError, match="biases key position 25, but this call has only 20 keys"):
        patched_attention(q, k, v, scaling=0.25, plan=lp)


def test_broadcast_and_wider_masks():
    """A [B, 1, 1, K'] mask (one row for every query, K' ≥ K keys) means the same as its expansion."""
    q, k, v = qkv(Q=6, K=30)
    key_ok = torch.ones(2, 1, 1, 34, dtype=torch.bool, device=DEVICE)
    key_ok[1, ..., :9] = False
    req = StatsRequest(argmax=True, entropy=True, received=True, queries=[4])  # a one-row window pass
    (out, st), (ref, rst) = both(q, k, v, stats=req, attention_mask=key_ok, is_causal=False)
    close_out(out, ref, torch.float16)
    close_stats(st, rst)
    assert "attention mask of shape" in unsupported_reason(q, k, v, key_ok[..., :20], None, None)
