"""ACT plans on cuDNN SDPA + the sparse sink correction (`headlab.kernels.act_sparse`) against the
Triton kernel and against plain SDPA, on one GPU.

    python benchmarks/act_bench.py --out benchmarks/results/act_bench_h100.json [--sweep]

bf16 at Llama-3-8B attention shapes (B=1, 32 q / 8 kv heads, d=128), causal prefill at 4k-64k.
Hidden sinks are planted so that ACT has work to do at every length: in every other query head,
a direction shared by its queries and three keys (position 0 and two head-specific positions),
strong enough that r[j] > τ = 0.1 at every length, so the paper's sink set is the two hidden
positions — planted "even" (all three alike: rows where a hidden sink takes most of the row are
common), "first" (the first token dominant, as in trained models) and "steady" ("first" with
little per-row variation); see `inputs`. Cases, ACT on all 32 heads (β = 0.4, τ = 0.1):
- `act_triton`: input-adaptive sinks on the Triton kernel (QK-only lse pass, column pass, fused pass);
- `act_routed`: the route (cuDNN with its log-sum-exp, the transposed column pass, the correction);
- `act_calibrated_triton` / `act_calibrated_routed`: the sink sets calibrated once and fixed in
  the plan (`InterventionPlan.act_with_sinks`) — the route is one cuDNN pass over sink-zeroed
  values + the correction;
and a breakdown of the routed pieces (16k; 4k for the calibrated route and the fix-up); one
decode step with the calibrated plan at 1k / 4k / 32k (and its host time at 1k); `generate`
(1k prompt + 64 tokens) on a Llama-3-8B-shaped model with a calibrated plan on every layer
(prefill and decode steps routed). `--sweep` first picks `fused.COLSUM_T_BLOCKS[128]`.
Parity of every path with the fp32 reference on the same bf16 inputs at 2k. Ratios are against
SDPA's default backend (cuDNN on Hopper) measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from headlab.kernels import act_sparse, fused, patched_attention, reference_attention, score_mod  # noqa: E402
from headlab.kernels.reference import act_sink_sets  # noqa: E402
from headlab.plan import InterventionPlan  # noqa: E402

from record import emit, header, interleaved  # noqa: E402

H, HKV, D = 32, 8, 128
DT = torch.bfloat16
SCALE = D ** -0.5


def bench(fn) -> float:
    """Median milliseconds (CUDA events, after warm-up)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def hidden_positions(h: int) -> list[int]:
    return [3 + h, 40 + 7 * h]


def inputs(n: int, seed: int = 0, planting: str = "even"):
    """q, k, v (HF layout views) with planted sinks in every other query head (module docstring).

    "even": position 0 and the two hidden positions get the same logit boost ln(0.6 n), ~17% of
    a row each on average; per-row noise often lets one hidden sink take most of a row.
    "first": the first token dominates as in trained models (boost ln(4.95 n): ~55% of a row),
    the hidden sinks take ~13% each (boost ln(1.155 n)). "steady": "first" without noise along
    the planted direction, so a hidden sink rarely takes most of a row (few rows with c_i > C_MAX,
    as on zoo:pycode-llama)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n, H, D, device="cuda", generator=g)
    k = torch.randn(1, n, HKV, D, device="cuda", generator=g)
    v = torch.randn(1, n, HKV, D, device="cuda", generator=g)
    first, hidden = (math.log(0.6 * n), math.log(0.6 * n)) if planting == "even" else (math.log(4.95 * n), math.log(1.155 * n))
    a = math.sqrt(first / SCALE)
    for h in range(0, H, 2):
        u = F.normalize(torch.randn(D, device="cuda", generator=g), dim=0)
        kvh = h // (H // HKV)
        if planting == "steady":  # no noise along u: a sink's logit varies only by the other dimensions' q·k
            q[0, :, h] -= (q[0, :, h] @ u)[:, None] * u
            for p in [0] + hidden_positions(h):
                k[0, p, kvh] -= (k[0, p, kvh] @ u) * u
        q[0, :, h] += a * u
        k[0, 0, kvh] += a * u
        k[0, hidden_positions(h), kvh] += (hidden / first) * a * u
    return (t.to(DT).transpose(1, 2) for t in (q, k, v))


def plans():
    adaptive = InterventionPlan().act([(0, h) for h in range(H)], beta=0.4, tau=0.1)
    calibrated = InterventionPlan().act_with_sinks({(0, h): hidden_positions(h) for h in range(0, H, 2)}, beta=0.4)
    return adaptive.compile_layer(0, H, D).to("cuda"), calibrated.compile_layer(0, H, D).to("cuda")


def cases(q, k, v, adaptive, calibrated):
    def routed(plan):
        return lambda: act_sparse.attend(q, k, v, plan, SCALE, True)[0]

    return {
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "act_triton": lambda: patched_attention(q, k, v, scaling=SCALE, is_causal=True, plan=adaptive)[0],
        "act_routed": routed(adaptive),
        "act_calibrated_triton": lambda: patched_attention(q, k, v, scaling=SCALE, is_causal=True, plan=calibrated)[0],
        "act_calibrated_routed": routed(calibrated),
    }


def parity(adaptive, calibrated, only: str | None = None) -> list[dict]:
    out = []
    for planting, label, plan in (("even", "adaptive", adaptive), ("first", "adaptive", adaptive),
                                  ("steady", "adaptive", adaptive), ("first", "calibrated", calibrated)):
        if only is not None and label != only:
            continue
        q, k, v = inputs(2048, seed=3, planting=planting)
        plain, _ = reference_attention(q.float(), k.float(), v.float(), scaling=SCALE, is_causal=True)
        expect, _ = reference_attention(q.float(), k.float(), v.float(), scaling=SCALE, is_causal=True, plan=plan)
        row = {"plan": label, "planting": planting, "keys": 2048,
               "plan_effect_max": round(float((expect - plain).abs().max()), 4)}
        fns = cases(q, k, v, adaptive, calibrated)
        for name in ("act_triton", "act_routed") if label == "adaptive" else ("act_calibrated_triton", "act_calibrated_routed"):
            got = fns[name]().float()
            row[f"{name}_max_abs_err"] = float((got - expect).abs().max())
            row[f"{name}_mean_abs_err"] = float((got - expect).abs().mean())
        out.append(row)
        print("parity", row, flush=True)
    return out


def sweep(rows: list[dict]) -> None:
    q, k, v = inputs(16384)
    _, lse = score_mod.attention_with_lse(q, k, v, SCALE, True)
    run = fused._Launch(q, k, None, SCALE, True, None, None, None, 0)
    best = None
    for cfg in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3),
                (128, 64, 8, 2), (128, 64, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3),
                (128, 32, 4, 2), (128, 64, 4, 2), (64, 32, 4, 4), (128, 16, 4, 3)]:
        fused.COLSUM_T_BLOCKS[D] = cfg
        try:
            ms = bench(lambda: run.received(lse, 0, 16384))
        except Exception as exc:  # noqa: BLE001 - a config that does not fit
            print(f"sweep colsum_t {cfg}: failed ({type(exc).__name__})", flush=True)
            continue
        print(f"sweep colsum_t {cfg}: {ms:.3f} ms", flush=True)
        rows.append({"sweep": "colsum_t", "config": cfg, "ms": round(ms, 4)})
        if best is None or ms < best[1]:
            best = (cfg, ms)
    fused.COLSUM_T_BLOCKS[D] = best[0]
    rows.append({"sweep": "colsum_t", "best": best[0], "keys": 16384})
    print(f"sweep colsum_t: best {best[0]}", flush=True)


def kernel_rows(rows: list[dict], adaptive, calibrated) -> None:
    for n in (4096, 16384, 32768, 65536):
        base = None
        for planting in ("even", "first", "steady"):
            q, k, v = inputs(n, planting=planting)
            fns = cases(q, k, v, adaptive, calibrated)
            if planting != "even":  # the Triton paths and SDPA do not depend on where the sinks are
                fns = {name: fns[name] for name in ("act_routed", "act_calibrated_routed")}
            for name, fn in fns.items():
                ms = bench(fn)
                base = base or ms
                rows.append({"mode": "prefill", "keys": n, "planting": planting, "case": name, "ms": round(ms, 4),
                             "vs_sdpa_default": round(base / ms, 3)})
                print(f"prefill K={n:>6} {planting:<5} {name:<22} {ms:9.3f} ms  x{base / ms:.3f} of SDPA default", flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def adaptive_rows(rows: list[dict], adaptive) -> None:
    """The input-adaptive route against cuDNN SDPA, both timed in two interleaved rounds per size
    and planting (cuDNN's own time moves by a few % between calls at 16k)."""
    for n in (4096, 16384, 32768, 65536):
        for planting in ("even", "first", "steady"):
            q, k, v = inputs(n, planting=planting)
            fns = {"sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   "act_routed": lambda: act_sparse.attend(q, k, v, adaptive, SCALE, True)[0]}
            for rnd in range(2):
                ms = {name: bench(fn) for name, fn in fns.items()}
                rows.append({"mode": "prefill_adaptive", "keys": n, "planting": planting, "round": rnd,
                             "sdpa_ms": round(ms["sdpa_default"], 4), "act_routed_ms": round(ms["act_routed"], 4),
                             "vs_sdpa_default": round(ms["sdpa_default"] / ms["act_routed"], 3)})
                print(f"prefill adaptive K={n:>6} {planting:<6} round {rnd}: SDPA {ms['sdpa_default']:.3f} ms, "
                      f"routed {ms['act_routed']:.3f} ms, x{ms['sdpa_default'] / ms['act_routed']:.3f}", flush=True)


def breakdown(rows: list[dict], adaptive, planting: str, n: int = 16384) -> None:
    """Where the routed input-adaptive ACT's time goes: each piece alone, the sink table against
    the PyTorch sets + lists it replaced (which read the list length back), and the rows above
    C_MAX recomputed."""
    q, k, v = inputs(n, planting=planting)
    z, lse = score_mod.attention_with_lse(q, k, v, SCALE, True)
    lse = lse.float().contiguous()
    recv, cnt = act_sparse.received(q, k, lse, SCALE, True)
    sinks, positions, member, count = act_sparse.sink_table(recv, cnt, adaptive, HKV)
    y, c = act_sparse.correct(z, lse, q, k, v, positions, member, adaptive, SCALE, True, False, True, count=count)

    parts = {
        "cudnn_with_lse": lambda: score_mod.attention_with_lse(q, k, v, SCALE, True),
        "column_pass_transposed": lambda: act_sparse.received(q, k, lse, SCALE, True),
        "sink_table": lambda: act_sparse.sink_table(recv, cnt, adaptive, HKV),
        "sink_sets_and_lists_pytorch": lambda: act_sparse.sink_lists(act_sink_sets(recv, cnt, adaptive), HKV),
        "correction_full_mode": lambda: act_sparse.correct(z, lse, q, k, v, positions, member, adaptive, SCALE, True,
                                                           False, True, count=count),
        "exact_rows": lambda: act_sparse.exact_rows(y, c, sinks, lse, q, k, v, adaptive, SCALE, True, True),
        "routed_total": lambda: act_sparse.attend(q, k, v, adaptive, SCALE, True),
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    for name, fn in parts.items():
        ms = bench(fn)
        rows.append({"mode": "breakdown", "keys": n, "planting": planting, "part": name, "ms": round(ms, 4)})
        print(f"breakdown K={n} {planting:<6} {name:<28} {ms:8.3f} ms", flush=True)
    rows.append({"mode": "breakdown", "keys": n, "planting": planting, "sinks_found": int(sinks.sum()),
                 "union_per_kv_head_max": int(count.max()),
                 "head_rows_above_c_max": int((c > act_sparse.C_MAX).sum()), "head_rows": c.numel(), "c_max": float(c.max())})
    print(rows[-1], flush=True)


def sweep_exact_rows(rows: list[dict], adaptive, n: int = 16384) -> None:
    """Time `act_sparse.EXACT_ROWS_BLOCKS` choices on the rows above C_MAX at n keys ("even": the
    most such rows) and set the best."""
    q, k, v = inputs(n, planting="even")
    z, lse = score_mod.attention_with_lse(q, k, v, SCALE, True)
    lse = lse.float().contiguous()
    recv, cnt = act_sparse.received(q, k, lse, SCALE, True)
    sinks, positions, member, count = act_sparse.sink_table(recv, cnt, adaptive, HKV)
    y, c = act_sparse.correct(z, lse, q, k, v, positions, member, adaptive, SCALE, True, False, True, count=count)
    best = None
    for cfg in [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (16, 64, 4, 2),
                (32, 128, 4, 2), (16, 32, 2, 3), (16, 64, 2, 3), (32, 32, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3)]:
        act_sparse.EXACT_ROWS_BLOCKS = cfg
        try:
            ms = bench(lambda: act_sparse.exact_rows(y, c, sinks, lse, q, k, v, adaptive, SCALE, True, True))
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses
            print(f"sweep exact_rows {cfg}: {type(exc).__name__}", flush=True)
            continue
        rows.append({"mode": "sweep_exact_rows", "keys": n, "blocks": list(cfg), "ms": round(ms, 4)})
        print(f"sweep exact_rows K={n} {cfg}: {ms * 1e3:.1f} us", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    act_sparse.EXACT_ROWS_BLOCKS = best[0]
    rows.append({"mode": "sweep_exact_rows", "keys": n, "best": list(best[0]),
                 "head_rows_above_c_max": int((c > act_sparse.C_MAX).sum())})
    print(f"sweep exact_rows K={n}: best {best[0]}", flush=True)


def calibrated_breakdown(rows: list[dict], calibrated, n: int) -> None:
    """The calibrated route's pieces (short inputs are where it trails cuDNN most)."""
    q, k, v = inputs(n, planting="first")
    lists = act_sparse.fixed_lists(calibrated, HKV, q.device)
    where = act_sparse._fixed_where(calibrated, HKV, n, q.device)
    zv = act_sparse.zeroed_values(v, lists[0], where)
    zm, lse = score_mod.attention_with_lse(q, k, zv, SCALE, True)
    parts = {
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "cudnn_with_lse_zeroed_values": lambda: score_mod.attention_with_lse(q, k, zv, SCALE, True),
        "zeroed_values_copy": lambda: act_sparse.zeroed_values(v, lists[0], where),
        "correction_masked_mode": lambda: act_sparse.correct(zm, lse, q, k, v, *lists, calibrated, SCALE, True, True, True),
        "routed_total": lambda: act_sparse.attend(q, k, v, calibrated, SCALE, True),
    }
    for name, fn in parts.items():
        ms = bench(fn)
        rows.append({"mode": "calibrated_breakdown", "keys": n, "part": name, "ms": round(ms, 4)})
        print(f"calibrated breakdown K={n} {name:<30} {ms:8.3f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    calls = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the route's GPU time, kernel by kernel
        for _ in range(calls):
            parts["routed_total"]()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        us = (getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)) / calls
        if us:
            rows.append({"mode": "calibrated_kernels", "keys": n, "kernel": ev.key[:80], "calls_per_route": ev.count / calls,
                         "us_per_route": round(us, 1)})
            print(f"calibrated kernels K={n} {ev.key[:60]:<60} x{ev.count / calls:g} {us:8.1f} us", flush=True)


def sweep_correction(rows: list[dict], calibrated) -> None:
    """Time `act_sparse.CORRECT_BLOCKS` choices for the calibrated route's correction (masked
    mode) at 4k and 16k; set the best summed over both."""
    choices = [(16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
    totals = dict.fromkeys(choices, 0.0)
    for n in (4096, 16384):
        q, k, v = inputs(n, planting="first")
        lists = act_sparse.fixed_lists(calibrated, HKV, q.device)
        zv = act_sparse.zeroed_values(v, lists[0], act_sparse._fixed_where(calibrated, HKV, n, q.device))
        zm, lse = score_mod.attention_with_lse(q, k, zv, SCALE, True)
        for cfg in choices:
            act_sparse.CORRECT_BLOCKS = cfg
            try:
                ms = bench(lambda: act_sparse.correct(zm, lse, q, k, v, *lists, calibrated, SCALE, True, True, True))
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses
                print(f"sweep correction K={n} {cfg}: {type(exc).__name__}", flush=True)
                totals[cfg] = float("inf")
                continue
            totals[cfg] += ms
            rows.append({"mode": "sweep_correction", "keys": n, "blocks": list(cfg), "ms": round(ms, 4)})
            print(f"sweep correction K={n} {cfg}: {ms * 1e3:.1f} us", flush=True)
    act_sparse.CORRECT_BLOCKS = min(totals, key=totals.get)
    rows.append({"mode": "sweep_correction", "best": list(act_sparse.CORRECT_BLOCKS)})
    print(f"sweep correction: best {act_sparse.CORRECT_BLOCKS}", flush=True)


def decode_rows(rows: list[dict], calibrated) -> None:
    """One decode step (batch 1) with the calibrated plan: SDPA vs the route (one attention call
    without the sinks + the correction up to DECODE_EXCLUDE_MAX_KEYS, over sink-zeroed values
    beyond) vs the Triton kernel; host time per call at 1k, where a step is host-bound."""
    import time

    for n in (1056, 4096, 32768):
        q, k, v = inputs(n, planting="first")
        q = q[:, :, -1:]
        def zeroed():  # the long-cache route at this length: over sink-zeroed values
            threshold = act_sparse.DECODE_EXCLUDE_MAX_KEYS
            act_sparse.DECODE_EXCLUDE_MAX_KEYS = 0
            try:
                return act_sparse.attend(q, k, v, calibrated, SCALE, True)[0]
            finally:
                act_sparse.DECODE_EXCLUDE_MAX_KEYS = threshold

        fns = {"sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               "act_calibrated_routed": lambda: act_sparse.attend(q, k, v, calibrated, SCALE, True)[0],
               "act_calibrated_zeroed_values": zeroed,
               "act_calibrated_triton": lambda: patched_attention(q, k, v, scaling=SCALE, is_causal=True, plan=calibrated)[0]}
        base = None
        for name, fn in fns.items():
            us = bench(fn) * 1e3
            base = base or us
            rows.append({"mode": "decode", "keys": n, "case": name, "us": round(us, 1), "vs_sdpa_default": round(base / us, 3)})
            print(f"decode K={n:>6} {name:<22} {us:9.1f} us  x{base / us:.3f} of SDPA default", flush=True)
            if n == 1056:
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(300):
                    fn()
                host = (time.perf_counter() - t0) / 300
                torch.cuda.synchronize()
                rows.append({"mode": "decode_host", "keys": n, "case": name, "host_us_per_call": round(host * 1e6, 1)})
                print(f"decode host K={n} {name:<22} {host * 1e6:7.1f} us/call", flush=True)


def end_to_end(rows: list[dict], prompt: int, new: int) -> None:
    """`generate` on a 32-layer Llama-3-8B-shaped model (random weights): plain vs a calibrated ACT
    plan (every other head of every layer, two sink positions each) routed and on the Triton
    kernel; 5 interleaved rounds, medians (batch-1 decode is host-bound and the host drifts)."""
    from retrieval_bench import llama3_8b_shaped

    model = llama3_8b_shaped(32)
    ids = torch.randint(0, 128000, (1, prompt), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    plan = InterventionPlan().act_with_sinks({(l, h): hidden_positions(h) for l in range(32) for h in range(0, H, 2)})

    def run(with_plan: bool, routed: bool, excluded: bool = True):
        original, threshold = score_mod.enabled, act_sparse.DECODE_EXCLUDE_MAX_KEYS
        if not routed:
            score_mod.enabled = lambda query: False
        if not excluded:
            act_sparse.DECODE_EXCLUDE_MAX_KEYS = 0
        try:
            with model.patched(plan if with_plan else None):
                return model.generate(ids, **kw)
        finally:
            score_mod.enabled, act_sparse.DECODE_EXCLUDE_MAX_KEYS = original, threshold

    configs = {"plain": lambda: run(False, True), "act_calibrated_routed": lambda: run(True, True),
               "act_calibrated_routed_zeroed_decode": lambda: run(True, True, excluded=False),
               "act_calibrated_triton": lambda: run(True, False)}
    for fn in configs.values():
        fn()
    med, samples = interleaved(configs, 5)
    for name, sec in med.items():
        rows.append({"mode": "e2e_generate", "prompt": prompt, "new_tokens": new, "case": name, "s_median": round(sec, 4),
                     "vs_plain": round(sec / med["plain"], 3), "samples_s": [round(x, 4) for x in samples[name]]})
        print(f"e2e {name:<22} {sec:.3f} s  x{sec / med['plain']:.3f} of plain generate", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true", help="decode rows and generate only")
    ap.add_argument("--sweep-correction", action="store_true", help="first pick act_sparse.CORRECT_BLOCKS")
    ap.add_argument("--sweep-exact-rows", action="store_true", help="first pick act_sparse.EXACT_ROWS_BLOCKS")
    ap.add_argument("--only-adaptive", action="store_true",
                    help="the input-adaptive route only: its prefill rows and pieces, no decode or generate")
    ap.add_argument("--only-calibrated", action="store_true",
                    help="the calibrated route's prefill pieces and totals only (with --sweep-correction: after it)")
    args = ap.parse_args()
    torch.manual_seed(0)
    adaptive, calibrated = plans()
    rows: list[dict] = []
    result = {**header(), "command": " ".join(sys.argv), "shape": f"B=1 H={H} Hkv={HKV} d={D} {DT} causal",
              "plan": "ACT beta=0.4 tau=0.1 on all 32 heads (adaptive); calibrated: the two planted hidden sinks of "
                      "every other head fixed in the plan", "seed": 0, "rows": rows}
    if args.sweep:
        sweep(rows)
    if args.sweep_correction:
        sweep_correction(rows, calibrated)
    if args.sweep_exact_rows:
        sweep_exact_rows(rows, adaptive)
    result["exact_rows_blocks"] = list(act_sparse.EXACT_ROWS_BLOCKS)
    if args.only_adaptive:
        result["parity"] = parity(adaptive, calibrated, only="adaptive")
        adaptive_rows(rows, adaptive)
        for planting, n in (("even", 16384), ("first", 16384), ("steady", 16384), ("even", 4096), ("even", 65536)):
            breakdown(rows, adaptive, planting, n)
        emit(result, args.out)
        return
    if args.only_calibrated:
        for n in (4096, 16384, 32768):
            calibrated_breakdown(rows, calibrated, n)
        result["correct_blocks"] = list(act_sparse.CORRECT_BLOCKS)
        emit(result, args.out)
        return
    result["colsum_t_blocks"] = fused.COLSUM_T_BLOCKS[D]
    if not args.skip_prefill:
        result["parity"] = parity(adaptive, calibrated)
        kernel_rows(rows, adaptive, calibrated)
        for planting, n in (("even", 16384), ("first", 16384), ("steady", 16384), ("steady", 4096)):
            breakdown(rows, adaptive, planting, n)
        for n in (4096, 16384):
            calibrated_breakdown(rows, calibrated, n)
    decode_rows(rows, calibrated)
    if not args.skip_e2e:
        end_to_end(rows, 1024, 64)
    emit(result, args.out)


if __name__ == "__main__":
    main()
