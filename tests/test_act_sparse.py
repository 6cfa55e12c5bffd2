"""ACT on plain attention + the exact sparse sink correction (`headlab.kernels.act_sparse`), and
calibrated sink sets (`InterventionPlan.act_with_sinks`, `analyses.act.calibrate_sinks`).

The route is algebra on the plain attention's output; these tests hold it to the reference
(`kernels.reference`, which calibrates the probability matrix itself) on the CPU: the formula in
both modes, the Triton correction and the transposed column pass (Triton's interpreter), the
sink table built on the device, the exact recomputation of rows whose factor c_i is large, and
the whole model path. Sinks are planted: per query head, a direction shared by its queries and a
few keys, so that the heads of one key/value group have different sink sets (the masked mode
adds the others' keys back).
"""

from __future__ import annotations

import pytest
import torch

import headlab
from headlab.errors import HeadlabError, PlanError
from headlab.kernels import act_sparse, reference_attention, score_mod
from headlab.kernels.reference import act_sink_sets
from headlab.plan import InterventionPlan

D = 16
SCALE = D ** -0.5
PLANTED = {0: [(1, 1.0), (4, 1.0), (9, 1.0)], 1: [(2, 1.0), (6, 1.0), (11, 1.0)], 2: [(3, 0.7), (5, 1.0)], 3: []}
"""query head -> (key position, strength) aligned with its queries (heads 0, 1 share key/value
head 0). Head 2's second sink outweighs its first: with strong planting its hidden sink takes
most of each row (S_i near 1, c_i above C_MAX)."""


def planted(n: int, strength: float, dtype=torch.float64, batch: int = 2, seed: int = 0):
    """q [B, 4, n, D], k / v [B, 2, n, D] with the PLANTED sinks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(batch, 2, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(batch, 2, n, D, generator=g, dtype=torch.float64)
    for h, positions in PLANTED.items():
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u = u / u.norm()
        q[:, h] += strength * u
        for p, f in positions:
            if p < n:
                k[:, h // 2, p] += f * strength * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def act_plan(heads=(0, 1, 2, 3), beta=0.4, tau=0.1, scale=None):
    plan = InterventionPlan().act([(0, h) for h in heads], beta=beta, tau=tau)
    if scale:
        plan = plan.scale_heads(scale)
    return plan.compile_layer(0, 4, D)


def exact_plain(q, k, v, causal=True):
    """(z, lse) of plain attention, computed directly (fp64 where the inputs are)."""
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * SCALE
    if causal:
        Q, K = q.shape[2], k.shape[2]
        visible = torch.arange(K)[None, :] <= (torch.arange(Q) + K - Q)[:, None]
        s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_the_correction_equals_the_reference(causal, masked):
    q, k, v = planted(24, 3.0)
    plan = act_plan()
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=causal, plan=plan)
    z, lse = exact_plain(q, k, v, causal)
    recv, cnt = act_sparse.received(q, k, lse, SCALE, causal)
    sinks = act_sink_sets(recv, cnt, plan)
    assert sinks[:, 0].any() and sinks[:, 1].any() and not torch.equal(sinks[:, 0], sinks[:, 1])  # a group's heads differ
    positions, member = act_sparse.sink_lists(sinks, 2)
    if masked:
        z, lse = exact_plain(q, k, act_sparse.zeroed_values(v, positions), causal)
    got, c = act_sparse.apply_act(z, lse, q, k, v, positions, member, plan.act_beta, SCALE, causal, masked)
    torch.testing.assert_close(got.float(), expect.float(), atol=2e-6, rtol=1e-5)  # the reference computes in fp32
    plain, _ = exact_plain(q, k, v, causal)
    assert (expect - plain).abs().max() > 0.05  # ACT moves the outputs: the parity is not vacuous
    assert c.max() > 1.05


def test_the_received_attention_equals_the_reference():
    """`act_sparse.received`: the transposed Triton column pass (interpreter) and the PyTorch one."""
    q, k, v = planted(40, 2.0, dtype=torch.float32)
    for causal in (True, False):
        _, lse = exact_plain(q, k, v, causal)
        attn = torch.softmax(
            (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * SCALE).masked_fill(
                causal & ~torch.ones(40, 40).tril().bool(), float("-inf")), -1)
        recv, cnt = act_sparse.received(q, k, lse, SCALE, causal)
        torch.testing.assert_close(recv, attn.sum(2), atol=1e-5, rtol=1e-5)
        expect_cnt = (40 - torch.arange(40)).float() if causal else torch.full((40,), 40.0)
        assert torch.equal(cnt, expect_cnt.expand(2, 4, 40))


def test_the_transposed_column_pass_equals_the_general_one():
    """`_attn_colsum_t` (plain logits, consecutive rows) against `_attn_colsum` on the same call:
    causal prefill, a chunk after a cache (queries < keys), a row window and full attention."""
    from headlab.kernels import fused

    if not fused.interpreting():
        pytest.skip("runs in Triton's interpreter on the CPU (the GPU run covers CUDA)")
    q, k, v = planted(37, 1.5, dtype=torch.float32)
    for qs, causal, lo, hi in ((slice(0, 37), True, 0, 37), (slice(20, 37), True, 0, 17), (slice(0, 37), True, 5, 29),
                               (slice(0, 37), False, 0, 37)):
        qq = q[:, :, qs]
        run = fused._Launch(qq, k, v, SCALE, causal, None, None, None, 37 - qq.shape[2])
        lse = run.forward(output=False)["lse"]
        fast = run.received(lse, lo, hi)
        general = run.received(lse, 0, 0, rows=torch.arange(lo, hi))
        torch.testing.assert_close(fast[0], general[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(fast[1], general[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_the_triton_correction_equals_the_pytorch_one(dtype, masked):
    """`_act_correct` (Triton's interpreter) against `apply_act`, with the output scale applied in the kernel."""
    if not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    q, k, v = planted(24, 3.0, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # the HF layout: a strided view
    plan = act_plan(scale={(0, 1): 1.25, (0, 3): 0.5})
    z, lse = exact_plain(q.double(), k.double(), v.double())
    recv, cnt = act_sparse.received(q.double(), k.double(), lse, SCALE, True)
    positions, member = act_sparse.sink_lists(act_sink_sets(recv, cnt, plan), 2)
    if masked:
        z, lse = exact_plain(q.double(), k.double(), act_sparse.zeroed_values(v, positions).double())
    z, lse = z.to(dtype), lse.float()
    expect, c_expect = act_sparse.apply_act(z, lse, q, k, v, positions, member, plan.act_beta, SCALE, True, masked)
    got, c = act_sparse.correct(z, lse, q, k, v, positions, member, plan, SCALE, True, masked, head_scale=True)
    assert got.dtype == dtype and got.shape == (2, 4, 24, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # the full mode is only used where c_i <= C_MAX (other rows: `exact_rows`); there both agree
    rows = (c_expect <= act_sparse.C_MAX)[..., None] if not masked else torch.ones(1, dtype=torch.bool)
    assert rows.float().mean() > 0.8
    want = (expect * plan.head_scale[None, :, None, None]).float()
    torch.testing.assert_close(torch.where(rows, got.float(), 0.0), torch.where(rows, want, 0.0), atol=tol, rtol=tol)
    torch.testing.assert_close(c, c_expect.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_the_triton_correction_takes_many_listed_keys(masked):
    """Many listed keys per key/value head (18 and 14 here), some listed for one head of the group
    only, some past the causal edge of early rows: `_act_correct` equals `apply_act`."""
    if not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    n = 40
    q, k, v = planted(n, 1.0, dtype=torch.float32)
    plan = InterventionPlan().act_with_sinks({(0, 0): list(range(0, 24, 2)), (0, 1): [1, 3, 5, 7, 9, 30],
                                              (0, 2): [0, 33], (0, 3): list(range(10, 22))}, beta=0.3)
    plan = plan.compile_layer(0, 4, D)
    positions, member = act_sparse.fixed_lists(plan, 2, q.device)
    assert positions.shape[-1] == 18
    z, lse = exact_plain(q.double(), k.double(), (act_sparse.zeroed_values(v, positions) if masked else v).double())
    z, lse = z.float(), lse.float()
    expect, c_expect = act_sparse.apply_act(z, lse, q, k, v, positions, member, plan.act_beta, SCALE, True, masked)
    got, c = act_sparse.correct(z, lse, q, k, v, positions, member, plan, SCALE, True, masked, head_scale=False)
    # rows the route keeps: c_i <= C_MAX by the kernel's own c (the others go to `exact_rows`); a row
    # all on its sinks (R_i ~ 0) has no defined c, and its rounding decides which side it falls
    moved = (c <= act_sparse.C_MAX) & (c_expect <= act_sparse.C_MAX)
    rows = moved if not masked else torch.ones_like(moved)
    assert moved.float().mean() > 0.9
    torch.testing.assert_close(got.float()[rows], expect.float()[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[moved], c_expect.float()[moved], atol=1e-5, rtol=1e-5)
    assert (c_expect[moved] > 1.05).any()  # the sinks moved mass: the comparison is not vacuous


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "triton"])
def test_a_row_on_its_own_sinks_only_stays_as_it_is(kernel):
    """The first row sees only the first token; with that a calibrated sink, R_0 = 0 exactly while
    1 − S_0 carries the log-sum-exp's rounding (+1e-6 here, as cuDNN's may): the row stays as it
    is, as the reference leaves it (taken as R_0, the noise made it β·U_0)."""
    if kernel and not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    q, k, v = planted(12, 1.0, dtype=torch.float32)
    plan = InterventionPlan().act_with_sinks({(0, h): [0, 5] for h in range(4)}, beta=0.3).compile_layer(0, 4, D)
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=plan)
    positions, member = act_sparse.fixed_lists(plan, 2, q.device)
    z, lse = exact_plain(q.double(), k.double(), act_sparse.zeroed_values(v, positions).double())
    z, lse = z.float(), lse.float() + 1e-6
    if kernel:
        got, _ = act_sparse.correct(z, lse, q, k, v, positions, member, plan, SCALE, True, True, head_scale=False)
    else:
        got, _ = act_sparse.apply_act(z, lse, q, k, v, positions, member, plan.act_beta, SCALE, True, True)
    torch.testing.assert_close(got[:, :, 0].float(), expect[:, :, 0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), expect.float(), atol=1e-4, rtol=1e-4)
    assert (expect[:, :, 1:] - exact_plain(q, k, v)[0][:, :, 1:]).abs().max() > 0.05  # ACT moved the other rows


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_rows_with_a_large_factor_are_recomputed_exactly(kernel, causal, monkeypatch):
    """Rows with c_i > C_MAX (a hidden sink takes most of the row: the full mode would amplify
    z's rounding by c_i) are recomputed from their logits — `_fix_rows` in PyTorch, on the Triton
    path the row lists built on the device (`_act_flag_rows`) and `_act_exact_rows` — and the
    result equals the reference; with the recomputation switched off (C_MAX = ∞) it does not."""
    if kernel and not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    if not kernel:
        monkeypatch.setattr(score_mod, "use_kernel", lambda query: False)
    plan = act_plan(scale={(0, 2): 1.5})
    for strength in (3.0, 6.0):
        q, k, v = planted(40, strength, dtype=torch.float32)
        expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=causal, plan=plan)
        got, scaled = act_sparse.attend(q, k, v, plan, SCALE, causal)
        if not scaled:
            got = got * plan.head_scale[None, :, None, None]
        torch.testing.assert_close(got.float(), expect, atol=5e-5, rtol=5e-5)
        z, lse = exact_plain(q, k, v, causal)
        recv, cnt = act_sparse.received(q, k, lse, SCALE, causal)
        positions, member = act_sparse.sink_lists(act_sink_sets(recv, cnt, plan), 2)
        _, c = act_sparse.apply_act(z, lse, q, k, v, positions, member, plan.act_beta, SCALE, causal, False)
        n_large = int((c > act_sparse.C_MAX).sum())
        if strength == 6.0:  # many rows to recompute, and without that the amplified rounding shows
            assert n_large >= 16
            with monkeypatch.context() as off_switch:
                off_switch.setattr(act_sparse, "C_MAX", float("inf"))
                off, _ = act_sparse.attend(q, k, v, plan, SCALE, causal)
            if not scaled:
                off = off * plan.head_scale[None, :, None, None]
            assert (off.float() - expect).abs().max() > 1e-4
        else:
            assert n_large <= 16


def test_the_sink_table_equals_the_sink_sets_and_lists():
    """`sink_table` (one Triton launch, no read back) against `act_sink_sets` + `sink_lists`: the
    dense sets, the lists' positions and members and their counts — sets that differ per batch
    row and per head of a group, keys above τ in several of the kernel's key blocks (the first one
    dropped per head), and a plan mixing input-adaptive heads with calibrated ones."""
    if not score_mod.use_kernel(torch.zeros(1, 1, 1, 16)):
        pytest.skip("needs triton (its interpreter on the CPU)")
    mixed = InterventionPlan().act([(0, 0), (0, 1), (0, 3)], tau=0.05).act_with_sinks({(0, 2): [1, 7, 30]})
    for plan, strength in ((act_plan(), 3.0), (act_plan(tau=0.05), 1.5), (mixed.compile_layer(0, 4, D), 3.0)):
        q, k, v = planted(40, strength, dtype=torch.float32, seed=4)
        k[1] = k[1].flip(1)  # batch row 1: other sink positions
        z, lse = exact_plain(q, k, v)
        recv, cnt = act_sparse.received(q, k, lse, SCALE, True)
        expect = act_sink_sets(recv, cnt, plan)
        sinks, positions, member, count = act_sparse.sink_table(recv, cnt, plan, 2)
        assert torch.equal(sinks.bool(), expect)
        assert expect.sum() >= 8 and not torch.equal(expect[0], expect[1])
        lists = act_sparse.sink_lists(expect, 2)
        for b in range(2):
            for kvh in range(2):
                n = int(count[b, kvh])
                assert n == int(expect[b, 2 * kvh: 2 * kvh + 2].any(0).sum())
                assert torch.equal(positions[b, kvh, :n], lists[0][b, kvh, :n])
                assert torch.equal(member[b, 2 * kvh: 2 * kvh + 2, :n], lists[1][b, 2 * kvh: 2 * kvh + 2, :n])
    assert expect[:, 2, [1, 7, 30]].all() and expect[:, 2].sum() == 6  # the calibrated head: its positions


def test_calibrated_sinks_are_the_papers_calibration_on_fixed_positions():
    """A plan whose fixed sinks equal what the paper finds on this input gives the input-adaptive
    plan's outputs (reference and route); other positions give other outputs; positions past the
    call's keys drop out; heads without ACT are untouched."""
    q, k, v = planted(24, 3.0, dtype=torch.float32, batch=1)
    adaptive = act_plan(heads=(0, 1, 2))
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=adaptive)
    z, lse = exact_plain(q, k, v)
    found = act_sink_sets(*act_sparse.received(q, k, lse, SCALE, True), adaptive)
    sets = {(0, h): found[0, h].nonzero().flatten().tolist() for h in range(3)}
    fixed = InterventionPlan().act_with_sinks({**sets, (0, 2): sets[(0, 2)] + [500]}).compile_layer(0, 4, D)
    assert not fixed.has_adaptive_act and fixed.has_act
    ref_fixed, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=fixed)
    torch.testing.assert_close(ref_fixed, expect, atol=1e-5, rtol=1e-5)
    routed, _ = act_sparse.attend(q, k, v, fixed, SCALE, True)
    torch.testing.assert_close(routed.float(), expect, atol=2e-5, rtol=2e-5)
    other = InterventionPlan().act_with_sinks({(0, 0): [7, 8]}).compile_layer(0, 4, D)
    moved, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=other)
    assert (moved - expect).abs().max() > 0.01
    plain, _ = exact_plain(q, k, v)
    torch.testing.assert_close(moved[:, 1:], plain[:, 1:].float(), atol=1e-5, rtol=1e-5)


def test_calibrated_sinks_save_load_and_errors(tmp_path):
    plan = InterventionPlan().act_with_sinks({(1, 2): [5, 3, 5]}, beta=0.3).act([(0, 1)])
    assert plan.act_heads[(1, 2)].sinks == (3, 5)
    lp = plan.compile_layer(1, 4, D)  # the host copy kernels set up from (no device read per layer)
    assert lp.act_max_sink == 5 and lp.act_sinks_host.device.type == "cpu"
    assert torch.equal(lp.act_sinks_host, lp.act_sinks) and lp.act_sinks_host.data_ptr() != lp.act_sinks.data_ptr()
    assert plan.compile_layer(0, 4, D).act_sinks_host is None and plan.compile_layer(0, 4, D).act_max_sink == -1
    again = InterventionPlan.from_dict(plan.to_dict())
    assert again.act_heads == plan.act_heads
    with pytest.raises(PlanError, match="non-empty list of key positions"):
        InterventionPlan().act_with_sinks({(0, 0): []})
    with pytest.raises(PlanError, match="key positions >= 0"):
        InterventionPlan().act_with_sinks({(0, 0): [-1]})
    with pytest.raises(PlanError, match="integer key positions"):
        InterventionPlan().act_with_sinks({(0, 0): [1.5]})
    with pytest.raises(PlanError, match="beta"):
        InterventionPlan().act_with_sinks({(0, 0): [1]}, beta=1.5)
    bad = plan.to_dict()
    bad["act"][0] = [0, 1, 0.4]
    with pytest.raises(PlanError, match="ACT entry"):
        InterventionPlan.from_dict(bad)


@pytest.mark.parametrize("case, reason", [
    ({"mask": True}, "an attention mask"),
    ({"q_len": 1, "mixed": True}, "mixing input-adaptive and calibrated"),
    ({"q_len": 4}, "a chunked prefill"),
    ({"softcap": 30.0}, "soft-capped logits"),
    ({"stats": True}, "probability stats"),
    ({"bias": True}, "changes logits besides ACT"),
])
def test_the_route_is_refused_where_it_does_not_hold(case, reason):
    plan = InterventionPlan().act([(0, 1)])
    if case.get("mixed"):
        plan = plan.act_with_sinks({(0, 2): [3]})
    if case.get("bias"):
        plan = plan.scale_first_token({(0, 2): 1.5})
    lp = plan.compile_layer(0, 4, D)
    q_len = case.get("q_len", 8)
    mask = torch.ones(1, 1, q_len, 8, dtype=torch.bool) if case.get("mask") else None
    got = act_sparse.route_reason(lp, q_len, 8, mask, True, case.get("softcap"), bool(case.get("stats")))
    assert got is not None and reason in got
    assert act_sparse.route_reason(act_plan(), 8, 8, None, True, None, False) is None
    calibrated = InterventionPlan().act_with_sinks({(0, 1): [2]}).compile_layer(0, 4, D)
    assert act_sparse.route_reason(calibrated, 1, 8, None, True, None, False) is None  # decode, fixed sinks


@pytest.mark.parametrize("route", ["excluded", "split", "zeroed"])
@pytest.mark.parametrize("k_len", [9, 30])
def test_a_decode_step_with_calibrated_sinks_equals_the_reference(k_len, route, monkeypatch):
    """One query against a cache: a short cache as one attention call without each head's sinks
    + the exact correction (`decode_excluded`); a long one (forced here) on the decode kernel
    without the sinks (`decode_excluded_split`), or, where the Triton kernels cannot run, as
    grouped rows over the sink-zeroed values + the correction; sinks past the cache (k_len 9 <
    position 11) drop out."""
    if route != "excluded":
        monkeypatch.setattr(act_sparse, "DECODE_EXCLUDE_MAX_KEYS", 0)
    if route == "zeroed":
        monkeypatch.setattr(act_sparse, "triton_decode_reason", lambda *a: "forced off")
    elif route == "split" and act_sparse.triton_decode_reason(*planted(4, 1.0, dtype=torch.float32)[:3], None):
        pytest.skip("the split route needs the Triton kernels (their interpreter on the CPU)")
    calls = {"excluded": [], "split": []}
    for name in calls:
        original = getattr(act_sparse, f"decode_{name}" if name == "excluded" else "decode_excluded_split")
        monkeypatch.setattr(act_sparse, f"decode_{name}" if name == "excluded" else "decode_excluded_split",
                            lambda *a, _o=original, _n=name: calls[_n].append(1) or _o(*a))
    q, k, v = planted(k_len, 3.0, dtype=torch.float32, seed=5)
    q = q[:, :, -1:]
    plan = (InterventionPlan().act_with_sinks({(0, 0): [4, 9], (0, 1): [6, 11], (0, 2): [5]})
            .scale_heads({(0, 2): 1.5}).compile_layer(0, 4, D))
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=plan)
    plain, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True)
    got, scaled = act_sparse.attend(q, k, v, plan, SCALE, True)
    if not scaled:
        got = got * plan.head_scale[None, :, None, None]
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=2e-5)
    assert (expect - plain).abs().max() > 0.01
    assert bool(calls["excluded"]) == (route == "excluded") and bool(calls["split"]) == (route == "split")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_decode_step_with_input_adaptive_sinks_equals_the_reference(kernel, masked, monkeypatch):
    """The paper's ACT in a decode step (`decode_adaptive`): the sink set from the step's own row
    (A > τ, its first key dropped), calibrated with S and R summed directly — on the Triton kernels
    (interpreter: the cache split in two, the first sink of a row in either split) and spelled out
    in PyTorch, equal to the reference; with a key mask (left padding over row 1's first keys and
    free slots past the step), a hidden key is no sink. Heads 0-2 ACT (head 2 with an output
    scale), head 3 untouched."""
    if not kernel:
        monkeypatch.setattr(act_sparse, "triton_decode_reason", lambda *a: "forced off")
    elif act_sparse.triton_decode_reason(*planted(4, 1.0, dtype=torch.float32)[:3], None):
        pytest.skip("the kernel half needs the Triton kernels (their interpreter on the CPU)")
    q, k, v = planted(48, 3.0, dtype=torch.float32, seed=9)
    q = q[:, :, 39:40]  # the step's query at position 39
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, 48, dtype=torch.bool)
        mask[:, ..., :40] = True
        mask[1, ..., :2] = False  # row 1's padding hides key 1, one of head 0's sinks
    else:
        k, v = k[:, :, :40], v[:, :, :40]
    plan = (InterventionPlan().act([(0, 0), (0, 1), (0, 2)], beta=0.3, tau=0.08).scale_heads({(0, 2): 1.5})
            .compile_layer(0, 4, D))
    assert act_sparse.route_reason(plan, 1, k.shape[2], mask, True, None, False) is None
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=mask is None, attention_mask=mask, plan=plan)
    plain, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=mask is None, attention_mask=mask)
    got, scaled = act_sparse.attend(q, k, v, plan, SCALE, True, attention_mask=mask)
    if not scaled:
        got = got * plan.head_scale[None, :, None, None]
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=2e-5)
    assert (expect - plain)[:, :3].abs().amax() > 0.05  # ACT moved the outputs
    torch.testing.assert_close(expect[:, 3], plain[:, 3])  # head 3 has no ACT
    mixed = InterventionPlan().act([(0, 0)]).act_with_sinks({(0, 1): [3]}).compile_layer(0, 4, D)
    assert "mixing" in act_sparse.route_reason(mixed, 1, 40, None, True, None, False)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_masked_decode_step_with_calibrated_sinks_equals_the_reference(kernel, monkeypatch):
    """A decode step with a key mask (`headlab.decode`'s static cache: left padding and free slots
    past the step) takes the route (`decode_excluded_split`): equal to the reference under the same
    mask, where row 1's padding hides one of head 0's sinks and the free slots hide a sink past the
    step. On the Triton decode kernel (interpreter) and spelled out in PyTorch."""
    if not kernel:
        monkeypatch.setattr(act_sparse, "triton_decode_reason", lambda *a: "forced off")
    elif act_sparse.triton_decode_reason(*planted(4, 1.0, dtype=torch.float32)[:3], None):
        pytest.skip("the kernel half needs the Triton kernels (their interpreter on the CPU)")
    q, k, v = planted(40, 3.0, dtype=torch.float32, seed=8)
    q = q[:, :, 29:30]  # the step's query at position 29; slots 30.. are free
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[:, ..., :30] = True
    mask[1, ..., :5] = False  # row 1 left-padded over positions 0-4 (hides head 0's sink 4)
    plan = (InterventionPlan().act_with_sinks({(0, 0): [4, 9], (0, 1): [6, 33], (0, 3): [2, 7]})
            .scale_heads({(0, 3): 0.5}).compile_layer(0, 4, D))
    assert act_sparse.route_reason(plan, 1, 40, mask, True, None, False) is None
    assert "mask" in act_sparse.route_reason(plan, 1, 40, mask.float(), True, None, False)  # not a boolean key mask
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=False, attention_mask=mask, plan=plan)
    plain, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=False, attention_mask=mask)
    got, scaled = act_sparse.attend(q, k, v, plan, SCALE, True, attention_mask=mask)
    if not scaled:
        got = got * plan.head_scale[None, :, None, None]
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=2e-5)
    assert (expect - plain).abs().max() > 0.01


def test_the_excluded_correction_kernel_and_a_row_that_sees_only_sinks():
    """`_act_excluded` (Triton's interpreter) against `apply_act_excluded`, and a decode step whose
    row sees only its head's sinks (cache of 2 keys, both sinks): left as it is, as the reference."""
    q, k, v = planted(2, 3.0, dtype=torch.float32, seed=6)
    q = q[:, :, -1:]
    plan = InterventionPlan().act_with_sinks({(0, 0): [0, 1], (0, 2): [1]}).compile_layer(0, 4, D)
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=plan)
    got, _ = act_sparse.decode_excluded(q, k, v, plan, SCALE)
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=2e-5)
    plain, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True)
    torch.testing.assert_close(expect[:, 0], plain[:, 0], atol=1e-6, rtol=1e-6)  # all on sinks: unchanged
    if not score_mod.use_kernel(q):
        pytest.skip("the kernel half needs triton (its interpreter on the CPU)")
    q2, k2, v2 = planted(40, 3.0, dtype=torch.float32, seed=7)
    q2 = q2[:, :, -1:]
    plan2 = InterventionPlan().act_with_sinks({(0, 0): [4, 9], (0, 1): [6, 11], (0, 3): [2]}).compile_layer(0, 4, D)
    positions, member = act_sparse.fixed_lists(plan2, 2, q2.device)
    bias = torch.zeros(4, 40)
    from headlab.kernels.reference import fixed_sink_mask

    bias[fixed_sink_mask(plan2, 40, q2.device)] = float("-inf")
    s = (q2 @ k2.repeat_interleave(2, 1).transpose(-1, -2)) * SCALE + bias[None, :, None, :]
    o_n, lse_n = torch.softmax(s, -1) @ v2.repeat_interleave(2, 1), torch.logsumexp(s, -1)
    spec = act_sparse.apply_act_excluded(o_n, lse_n, q2, k2, v2, positions, member, plan2.act_beta, SCALE)
    expect2, _ = reference_attention(q2, k2, v2, scaling=SCALE, is_causal=True, plan=plan2)
    torch.testing.assert_close(spec, expect2, atol=2e-5, rtol=2e-5)
    got2, scaled = act_sparse.decode_excluded(q2, k2, v2, plan2, SCALE)
    assert scaled
    torch.testing.assert_close(got2.float(), expect2, atol=2e-5, rtol=2e-5)


def test_model_path_with_the_route_equals_the_reference(monkeypatch):
    """zoo:pycode-llama (heads from real training): input-adaptive ACT with a head scale and a
    pruned head, and a calibrated plan from `calibrate_sinks`, routed vs the exact reference —
    logits of a prefill and the greedy tokens of a cached generation."""
    from headlab.analyses import act

    model = headlab.load_model("zoo:pycode-llama")
    text = 'VALUE = "alpha"\nprint(VALUE)\nassert VALUE == "alpha"\nfor i in range(3):\n    print(i)\n'
    ids = model.tokenize(text)["input_ids"]
    heads = [(l, h) for l in (1, 2, 3) for h in range(model.spec.n_heads)]
    adaptive = InterventionPlan().act(heads).scale_heads({(2, 4): 1.3}).prune_heads([(1, 0)])
    calibrated = act.calibrate_sinks(model, [text, text + "x = 1\n"], heads, progress=False)
    assert calibrated.act_heads and all(s.sinks for s in calibrated.act_heads.values())
    with model.patched(InterventionPlan()):
        plain = model(ids).logits
    for plan in (adaptive, calibrated):
        with model.patched(plan):
            expect = model(ids).logits
            expect_gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        calls = []
        original = act_sparse.attend
        monkeypatch.setattr(score_mod, "enabled", lambda query: True)
        monkeypatch.setattr(act_sparse, "attend", lambda *a, **k: calls.append(1) or original(*a, **k))
        with model.patched(plan):
            got = model(ids).logits
            got_gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        monkeypatch.undo()
        # the prefill of both forwards and the 4 decode steps, 3 layers each (adaptive decode: `decode_adaptive`)
        assert len(calls) == 3 * 2 + 3 * 4
        assert torch.equal(got_gen, expect_gen)
        # fp32 on the CPU: R_i = 1 − S_i (the named difference) where a hidden sink takes a row
        torch.testing.assert_close(got, expect, atol=1e-3, rtol=1e-4)
        assert (expect - plain).abs().max() > 0.01  # the plan matters: the parity is not vacuous


def test_calibrate_sinks_checks_its_input():
    from headlab.analyses import act

    model = headlab.load_model("zoo:pycode-llama")
    with pytest.raises(HeadlabError, match="min_share"):
        act.calibrate_sinks(model, ["x = 1"], [(1, 0)], min_share=0)
    with pytest.raises(HeadlabError, match="at least one calibration input"):
        act.calibrate_sinks(model, [], [(1, 0)])
    with pytest.raises(HeadlabError):
        act.calibrate_sinks(model, ["x = 1"], [(99, 0)])


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a GPU (the GPU run of benchmarks/score_mod_bench.py records this)")
@pytest.mark.parametrize("n, planting", [(1024, "even"), (1024, "first"), (3000, "first")])
def test_the_cuda_route_matches_the_reference_at_cuda_shapes(n, planting):
    """bf16 at Llama-3-8B attention shapes (32 q / 8 kv heads, d=128) with the benchmark's planted
    hidden sinks: input-adaptive ACT (cuDNN + column pass + sink table + correction, rows above
    C_MAX recomputed by `exact_rows`) and calibrated sinks (the masked pass), against the fp32 reference."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("act_bench", Path(__file__).parents[1] / "benchmarks" / "act_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    q, k, v = bench.inputs(n, seed=1, planting=planting)
    H, Dh = 32, 128
    adaptive = InterventionPlan().act([(0, h) for h in range(H)]).scale_heads({(0, 1): 1.2, (0, 2): 0.8})
    fixed = InterventionPlan().act_with_sinks({(0, h): bench.hidden_positions(h) for h in range(0, H, 2)})
    for plan in (adaptive, fixed):
        lp = plan.compile_layer(0, H, Dh).to("cuda")
        assert score_mod.enabled(q) and act_sparse.route_reason(lp, n, n, None, True, None, False) is None
        expect, _ = reference_attention(q.float(), k.float(), v.float(), scaling=Dh ** -0.5, is_causal=True, plan=lp)
        plain, _ = reference_attention(q.float(), k.float(), v.float(), scaling=Dh ** -0.5, is_causal=True)
        got, scaled = act_sparse.attend(q, k, v, lp, Dh ** -0.5, True)
        assert scaled and got.dtype == torch.bfloat16
        assert (expect - plain).abs().max() > 0.05
        err = (got.float() - expect).abs()
        assert err.max() < 0.05 and err.mean() < 1e-3
    # a decode step with the calibrated sinks: one query against the whole cache
    lp = fixed.compile_layer(0, H, Dh).to("cuda")
    q1 = q[:, :, -1:]
    assert act_sparse.route_reason(lp, 1, n, None, True, None, False) is None
    expect, _ = reference_attention(q1.float(), k.float(), v.float(), scaling=Dh ** -0.5, is_causal=True, plan=lp)
    got, _ = act_sparse.attend(q1, k, v, lp, Dh ** -0.5, True)
    assert (got.float() - expect).abs().max() < 0.03
    # the same step over a static cache with a key mask (free slots past the step, row padding),
    # and over a long cache: the Triton decode kernel without the sinks + the correction
    free = torch.zeros_like(k[:, :, :64])
    k2, v2 = torch.cat([k, free], 2), torch.cat([v, free], 2)
    mask = torch.zeros(1, 1, 1, n + 64, dtype=torch.bool, device="cuda")
    mask[..., :n] = True
    assert act_sparse.route_reason(lp, 1, n + 64, mask, True, None, False) is None
    expect_m, _ = reference_attention(q1.float(), k2.float(), v2.float(), scaling=Dh ** -0.5, is_causal=False,
                                      attention_mask=mask, plan=lp)
    got_m, _ = act_sparse.attend(q1, k2, v2, lp, Dh ** -0.5, True, attention_mask=mask)
    assert (got_m.float() - expect_m).abs().max() < 0.03
    torch.testing.assert_close(expect_m, expect, atol=1e-5, rtol=1e-5)  # the free slots are no keys
    long_k, long_v = k.repeat(1, 1, 4, 1), v.repeat(1, 1, 4, 1)  # past DECODE_EXCLUDE_MAX_KEYS: split over the GPU
    expect_l, _ = reference_attention(q1.float(), long_k.float(), long_v.float(), scaling=Dh ** -0.5, is_causal=True,
                                      plan=lp)
    got_l, _ = act_sparse.attend(q1, long_k, long_v, lp, Dh ** -0.5, True)
    assert (got_l.float() - expect_l).abs().max() < 0.03
    # the paper's input-adaptive sinks in a decode step (`decode_adaptive`), with and without the key mask
    la = adaptive.compile_layer(0, H, Dh).to("cuda")
    for kk, vv, m in ((k, v, None), (k2, v2, mask)):
        assert act_sparse.route_reason(la, 1, kk.shape[2], m, True, None, False) is None
        expect_a, _ = reference_attention(q1.float(), kk.float(), vv.float(), scaling=Dh ** -0.5, is_causal=m is None,
                                          attention_mask=m, plan=la)
        got_a, scaled = act_sparse.attend(q1, kk, vv, la, Dh ** -0.5, True, attention_mask=m)
        assert scaled and (got_a.float() - expect_a).abs().max() < 0.03


def test_adaptive_decode_moves_the_first_sink_of_the_right_split():
    """`_act_adaptive_combine` takes the row's first sink from whichever split holds it: sinks planted
    only in the second split (keys 35, 38 of 40) for head 0, in both splits (4, 36) for head 2."""
    q, k, v = planted(40, 0.0, dtype=torch.float32, seed=10, batch=1)
    if act_sparse.triton_decode_reason(q, k, v, None):
        pytest.skip("needs the Triton kernels (their interpreter on the CPU)")
    q = q[:, :, -1:]
    g = torch.Generator().manual_seed(11)
    for h, positions in ((0, [35, 38]), (2, [4, 36])):
        u = torch.randn(D, generator=g, dtype=torch.float64).float()
        u = u / u.norm()
        q[0, h, 0] += 4.0 * u
        for p_ in positions:
            k[0, h // 2, p_] = 3.0 * u  # alike: the two planted keys share the row's sink mass
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * SCALE, -1)[0, :, 0]
    for h, positions in ((0, [35, 38]), (2, [4, 36])):
        assert (probs[h, positions] > 0.1).all()  # both planted keys are sinks: the second one stays one
    plan = InterventionPlan().act([(0, 0), (0, 2)], beta=0.2, tau=0.1).compile_layer(0, 4, D)
    expect, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True, plan=plan)
    plain, _ = reference_attention(q, k, v, scaling=SCALE, is_causal=True)
    got, _ = act_sparse.attend(q, k, v, plan, SCALE, True)
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=2e-5)
    assert (expect - plain)[:, 0].abs().amax() > 0.01 and (expect - plain)[:, 2].abs().amax() > 0.01
