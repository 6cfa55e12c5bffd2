"""Benchmark of the Triton patched attention against SDPA (flash) and FlexAttention, same run.

Not a test: it prints TFLOP/s, ratios and peak memory, and writes them with the device, versions
and date. Shapes: batch 1, 32 query / 8 key-value heads, head_dim 128, bf16, causal.

    python kernels/bench.py --out benchmarks/results/kernel_bench_h100.json [--sweep] [--e2e]
    python kernels/bench.py --out benchmarks/results/kernel_prefill_h100.json --prefill-only
    python kernels/bench.py --out stats_pass_h100.json --skip-kernels --no-flex --stats-breakdown [--window-breakdown]
    python kernels/bench.py --out descriptors.json --skip-kernels --no-flex --hopper-breakdown --rounds 2

Cases (issue 4): (a) no intervention; (b) per-head first-token bias + head scale; (c) ACT on every
head, sinks found on the same input; (d) stats — argmax + 3 span masses + entropy — on all
queries, and on the last 256 queries (the path `headlab_attention_forward` takes: SDPA output +
one QK-only Triton pass over the window). Decode: one query against a 32k / 128k cache, plain,
with (b), and with the (d) stats. `--e2e`: a 32-layer Llama-3-8B-shaped model (random weights)
at 32k tokens, plain SDPA forward vs a patched forward with the (d) stats on the last 256 queries
of every layer. `--stats-breakdown` / `--window-breakdown` time case (d)'s passes per stat and per
knob of `headlab.kernels.fused` (SPAN_POST, HEAVY_FIRST, FOLD_SCALE, KV_DESC, block shape);
`--hopper-breakdown` the passes with the argmax through tensor descriptors or pointer loads;
`--span-breakdown` case (d)'s key-set masses per SPAN_CHUNK.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from headlab.kernels import fused

from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest

H, HKV, D = 32, 8, 128
DT = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds (CUDA events, after warm-up)."""
    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def peak_gib(fn) -> float:
    """Peak memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def inputs(n_q: int, n_k: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n_q, H, D, device="cuda", dtype=DT, generator=g).transpose(1, 2)  # HF layout views
    k = torch.randn(1, n_k, HKV, D, device="cuda", dtype=DT, generator=g).transpose(1, 2)
    v = torch.randn(1, n_k, HKV, D, device="cuda", dtype=DT, generator=g).transpose(1, 2)
    return q, k, v


def sdpa_fn(q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return run


def flex_fns(q, k, v, bias: torch.Tensor, head_scale: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_q, n_k = q.shape[2], k.shape[2]
    off = n_k - n_q
    block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, n_q, n_k, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, qi, ki):
        return score + torch.where(ki == 0, bias[h], 0.0)

    def plain():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    def biased():
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True) * head_scale[None, :, None, None]
    return plain, biased


def headlab_fn(q, k, v, plan: InterventionPlan | None = None, stats: StatsRequest | None = None, window_path: bool = False):
    lp = plan.compile_layer(0, H, D).to("cuda") if plan is not None else None
    cs = stats.compile(q.shape[2], k.shape[2], torch.device("cuda")) if stats is not None else None
    scaling = D ** -0.5
    if window_path:  # what headlab_attention_forward does for output-preserving plans: SDPA + window stats
        sel = slice(int(cs.query_index[0]), int(cs.query_index[-1]) + 1)
        from dataclasses import replace

        win = replace(cs, query_index=torch.arange(cs.query_index.numel()))
        first = k.shape[2] - q.shape[2] + sel.start

        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            fused.patched_attention(q[:, :, sel], k, v, scaling=scaling, stats=win, query_positions=first,
                                    compute_output=False)
            return out
        return run
    return lambda: fused.patched_attention(q, k, v, scaling=scaling, plan=lp, stats=cs)


def causal_flops(n_q: int, n_k: int) -> float:
    """Matmul FLOPs of causal attention (bottom-right aligned), both products."""
    visible = n_q * (n_k - n_q) + n_q * (n_q + 1) / 2
    return 4.0 * H * D * visible


def sweep(rows: list[dict]) -> None:
    """Pick PREFILL_BLOCKS / QK_ONLY_BLOCKS[128] by timing candidates at 16k (case a and the QK-only pass)."""
    q, k, v = inputs(16384, 16384)
    cands = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3),
             (128, 128, 8, 2)]
    argmax = StatsRequest(argmax=True).compile(16384, 16384, torch.device("cuda"))
    for table, label, kw in ((fused.PREFILL_BLOCKS, "output", {}),
                             (fused.QK_ONLY_BLOCKS, "qk_only", {"compute_output": False, "stats": argmax})):
        best = None
        for cfg in cands:
            table[D] = cfg
            try:
                ms = bench(lambda kw=kw: fused.patched_attention(q, k, v, scaling=D ** -0.5, **kw))
            except Exception as exc:  # noqa: BLE001 - out of shared memory / registers for this config
                print(f"sweep {label} {cfg}: failed ({type(exc).__name__})")
                continue
            tf = causal_flops(16384, 16384) / (2 if label == "qk_only" else 1) / ms / 1e9
            print(f"sweep {label} {cfg}: {ms:.3f} ms, {tf:.0f} TFLOP/s")
            rows.append({"sweep": label, "config": cfg, "ms": ms})
            if best is None or ms < best[1]:
                best = (cfg, ms)
        table[D] = best[0]
        print(f"sweep {label}: best {best[0]}")
    lse = fused._Launch(q, k, v, D ** -0.5, True, None, None, None, 0).forward(output=False)["lse"]
    run = fused._Launch(q, k, v, D ** -0.5, True, None, None, None, 0)
    best = None
    for cfg in [(64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 3), (128, 128, 8, 2), (32, 128, 4, 3)]:
        fused.COLSUM_BLOCKS[D] = cfg
        try:
            ms = bench(lambda: run.received(lse, 0, 16384))
        except Exception as exc:
            print(f"sweep colsum {cfg}: failed ({type(exc).__name__})")
            continue
        print(f"sweep colsum {cfg}: {ms:.3f} ms")
        rows.append({"sweep": "colsum", "config": cfg, "ms": ms})
        if best is None or ms < best[1]:
            best = (cfg, ms)
    fused.COLSUM_BLOCKS[D] = best[0]
    print(f"sweep colsum: best {best[0]}")


def sweep_stats(rows: list[dict]) -> None:
    """Pick STATS_BLOCKS[128] by timing the output pass with case (d)'s stats on all queries at 16k."""
    n = 16384
    q, k, v = inputs(n, n)
    spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
    stats = StatsRequest(argmax=True, entropy=True, spans=spans).compile(n, n, torch.device("cuda"))
    best = None
    for cfg in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
                (128, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 4)]:
        fused.STATS_BLOCKS[D] = cfg
        try:
            ms = bench(lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=stats))
        except Exception as exc:  # noqa: BLE001 - out of shared memory / registers for this config
            print(f"sweep stats {cfg}: failed ({type(exc).__name__})", flush=True)
            continue
        print(f"sweep stats {cfg}: {ms:.3f} ms", flush=True)
        rows.append({"sweep": "stats", "config": cfg, "ms": ms})
        if best is None or ms < best[1]:
            best = (cfg, ms)
    fused.STATS_BLOCKS[D] = best[0]
    print(f"sweep stats: best {best[0]}", flush=True)


STATS_KNOBS = ("STATS_BLOCKS", "SPAN_POST", "HEAVY_FIRST", "FOLD_SCALE")
FORMER = {"SPAN_POST": False, "HEAVY_FIRST": False, "FOLD_SCALE": False}
"""The pass before these knobs, as far as they reach back (key sets in every block, row order, scale then
subtract; its argmax, a block-wide vote then tl.argmax, is gone: results/stats_pass_h100.json has it)."""


def _set_knobs(knobs: dict) -> None:
    for name, value in knobs.items():
        if name in ("STATS_BLOCKS", "PREFILL_BLOCKS"):
            getattr(fused, name)[D] = value
        else:
            setattr(fused, name, value)


def _bias_scale_plan() -> InterventionPlan:
    """Case (b)'s plan for the breakdowns: a first-token bias and an output scale on every head (seed 1)."""
    gen = torch.Generator().manual_seed(1)
    return InterventionPlan().scale_first_token(
        {(0, h): float(g) for h, g in enumerate(torch.rand(H, generator=gen) * 3 + 0.2)}).scale_heads(
        {(0, h): float(s) for h, s in enumerate(torch.rand(H, generator=gen) + 0.5)})


def _breakdown_fn(name: str, reqs: dict, bias_plan: InterventionPlan, q, k, v):
    """The call a breakdown times for case `name`: the bias + scale plan, or the fused pass with the
    stats of reqs[name] (none for "plain"), compiled under the knobs set now."""
    if name == "bias_scale":
        return headlab_fn(q, k, v, bias_plan)
    cs = reqs[name].compile(q.shape[2], k.shape[2], q.device) if name in reqs else None
    return lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=cs)


def _bench_or_record(fn, rows: list[dict], row: dict, label: str) -> float | None:
    """bench(fn) in ms, or None after recording why the compiler or the GPU refused this config."""
    try:
        return bench(fn)
    except Exception as exc:  # noqa: BLE001 - out of shared memory / registers, a failed build
        print(f"{label}: failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
        rows.append({**row, "error": str(exc)[:300]})
        return None


def stats_breakdown(sizes: list[int], rows: list[dict]) -> None:
    """Where case (d)'s time goes: the fused pass with each stat alone and all together, under the
    pass's knobs (`fused.SPAN_POST`, `HEAVY_FIRST`, `FOLD_SCALE`, the block shape),
    against cuDNN SDPA in the same run; the plain pass and a bias + head-scale plan (whose logits
    cannot fold the scale) under each grid order. At the first size every variant; at the others
    the former pass and the module's choices."""
    saved = {k: (fused.STATS_BLOCKS[D] if k == "STATS_BLOCKS" else getattr(fused, k)) for k in STATS_KNOBS}
    new = {"SPAN_POST": True, "HEAVY_FIRST": True, "FOLD_SCALE": True}
    wide, narrow = (128, 128, 8, 3), (128, 64, 8, 3)
    bias_plan = _bias_scale_plan()
    for n in sizes:
        q, k, v = inputs(n, n, seed=n)
        spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
        reqs = {
            "argmax": StatsRequest(argmax=True), "entropy": StatsRequest(entropy=True),
            "spans": StatsRequest(spans=spans), "all": StatsRequest(argmax=True, entropy=True, spans=spans),
        }
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"mode": "stats_breakdown", "N": n, "case": "cudnn", "ms": round(cudnn, 4)})
        variants = [("plain", FORMER), ("plain", {**FORMER, "HEAVY_FIRST": True}),
                    ("plain", {**FORMER, "FOLD_SCALE": True}), ("plain", new),
                    ("bias_scale", {"HEAVY_FIRST": False}), ("bias_scale", {"HEAVY_FIRST": True}),
                    ("all", {**FORMER, "STATS_BLOCKS": wide}), ("all", {**new, "STATS_BLOCKS": wide})]
        if n == sizes[0]:
            variants += [("argmax", {**new, "STATS_BLOCKS": wide}), ("argmax", {**new, "STATS_BLOCKS": narrow}),
                         ("entropy", {**new, "STATS_BLOCKS": wide}), ("entropy", {**FORMER, "STATS_BLOCKS": wide}),
                         ("spans", {**new, "STATS_BLOCKS": wide}),
                         ("spans", {**new, "STATS_BLOCKS": wide, "SPAN_POST": False}),
                         ("all", {**new, "STATS_BLOCKS": narrow}), ("all", {**new, "STATS_BLOCKS": (128, 128, 8, 2)}),
                         ("all", {**new, "STATS_BLOCKS": narrow, "SPAN_POST": False})]
        plain_new = None
        for name, knobs in variants:
            _set_knobs({**saved, **knobs})
            ms = _bench_or_record(_breakdown_fn(name, reqs, bias_plan, q, k, v), rows,
                                  {"mode": "stats_breakdown", "N": n, "case": name, **knobs}, f"stats N={n} {name} {knobs}")
            if ms is None:
                continue
            if name == "plain" and knobs is new:
                plain_new = ms
            row = {"mode": "stats_breakdown", "N": n, "case": name, **knobs, "ms": round(ms, 4),
                   "vs_cudnn": round(cudnn / ms, 3)}
            if plain_new is not None and name in reqs:
                row["over_plain"] = round(ms / plain_new, 3)
            rows.append(row)
            print(f"stats N={n} {name:<10} {knobs}: {ms:8.3f} ms x{cudnn / ms:.3f} cuDNN"
                  + (f", {row['over_plain']:.3f} of plain" if "over_plain" in row else ""), flush=True)
    _set_knobs(saved)


def hopper_breakdown(sizes: list[int], rows: list[dict], rounds: int = 1, block_shapes: bool = True) -> None:
    """The prefill pass with the argmax (alone, with entropy, with every stat) reading its key / value
    blocks through tensor descriptors (`fused.KV_DESC`) or pointer loads, and the plain and bias +
    head-scale passes (pointer loads), against cuDNN in the same run; at the first size under several
    block shapes (`block_shapes`). `rounds` > 1 repeats every size's cases, cuDNN included, in turn.
    (Measured and removed since: descriptors for the plain pass, stats after the P·V product,
    `tl.range(warp_specialize=True)`; results/stats_pass_h100.json `descriptor_runs`.)"""
    saved = {"KV_DESC": fused.KV_DESC, "PREFILL_BLOCKS": fused.PREFILL_BLOCKS[D], "STATS_BLOCKS": fused.STATS_BLOCKS[D]}
    bias_plan = _bias_scale_plan()
    shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2),
              (64, 128, 4, 3), (64, 32, 4, 4)]
    for n, rnd in [(n, r) for n in sizes for r in range(rounds)]:
        q, k, v = inputs(n, n, seed=n)
        spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
        reqs = {"argmax": StatsRequest(argmax=True), "argmax_entropy": StatsRequest(argmax=True, entropy=True),
                "all": StatsRequest(argmax=True, entropy=True, spans=spans)}
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"mode": "hopper_breakdown", "N": n, "round": rnd, "case": "cudnn", "ms": round(cudnn, 4)})
        for name in ("plain", "bias_scale", "argmax", "argmax_entropy", "all"):
            block_knob = "STATS_BLOCKS" if name in reqs else "PREFILL_BLOCKS"
            for desc in ((False, True) if name in reqs else (False,)):
                sweep_here = block_shapes and n == sizes[0] and rnd == 0 and name in ("plain", "argmax", "all")
                for shape in (shapes if sweep_here else [saved[block_knob]]):
                    knobs = {"KV_DESC": desc, block_knob: shape}
                    _set_knobs({**saved, **knobs})
                    ms = _bench_or_record(_breakdown_fn(name, reqs, bias_plan, q, k, v), rows,
                                          {"mode": "hopper_breakdown", "N": n, "round": rnd, "case": name, **knobs},
                                          f"hopper N={n} {name} {knobs}")
                    if ms is None:
                        continue
                    rows.append({"mode": "hopper_breakdown", "N": n, "round": rnd, "case": name, **knobs,
                                 "ms": round(ms, 4), "vs_cudnn": round(cudnn / ms, 3)})
                    print(f"hopper N={n} {name:<14} {knobs}: {ms:8.3f} ms x{cudnn / ms:.3f} cuDNN", flush=True)
    _set_knobs(saved)


def span_breakdown(sizes: list[int], rows: list[dict], rounds: int = 2) -> None:
    """Case (d)'s key-set masses after the main loop (`fused.SPAN_POST`) per `fused.SPAN_CHUNK`
    (keys gathered per step: fewer, longer steps after each row block's loop), against the same
    pass without key sets and cuDNN, in `rounds` interleaved rounds per size."""
    saved = fused.SPAN_CHUNK
    for n, rnd in [(n, r) for n in sizes for r in range(rounds)]:
        q, k, v = inputs(n, n, seed=n)
        spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
        reqs = {"argmax_entropy": StatsRequest(argmax=True, entropy=True),
                "all": StatsRequest(argmax=True, entropy=True, spans=spans)}
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"mode": "span_breakdown", "N": n, "round": rnd, "case": "cudnn", "ms": round(cudnn, 4)})
        for name, chunk in [("argmax_entropy", saved)] + [("all", c) for c in (16, 32, 64)]:
            fused.SPAN_CHUNK = chunk
            row = {"mode": "span_breakdown", "N": n, "round": rnd, "case": name, "SPAN_CHUNK": chunk}
            ms = _bench_or_record(_breakdown_fn(name, reqs, None, q, k, v), rows, row, f"span N={n} {name} {chunk}")
            if ms is None:
                continue
            rows.append({**row, "ms": round(ms, 4), "vs_cudnn": round(cudnn / ms, 3)})
            print(f"span N={n} {name:<14} chunk {chunk:>3}: {ms:8.3f} ms x{cudnn / ms:.3f} cuDNN", flush=True)
    fused.SPAN_CHUNK = saved


def window_breakdown(sizes: list[int], rows: list[dict]) -> None:
    """Case (d) on the last 256 queries: the QK-only pass over the window with the stats (what runs
    after SDPA's output), timed alone, under the pass's knobs and per stat; SDPA in the same run.
    (results/stats_pass_h100.json `window_run` timed SDPA + the pass, with an argmax vote since removed.)"""
    knobs0 = {k: getattr(fused, k) for k in ("SPAN_POST", "HEAVY_FIRST", "FOLD_SCALE", "KV_DESC")}
    for n in sizes:
        q, k, v = inputs(n, n, seed=n)
        spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"mode": "window_breakdown", "N": n, "case": "cudnn", "ms": round(sdpa, 4)})
        reqs = {"all": dict(argmax=True, entropy=True, spans=spans), "argmax": dict(argmax=True),
                "entropy": dict(entropy=True), "spans": dict(spans=spans)}
        variants = [("all", {}), ("all", {"KV_DESC": False}), ("argmax", {"KV_DESC": False}),
                    ("all", {"SPAN_POST": False}), ("all", {"FOLD_SCALE": False}),
                    ("all", {"HEAVY_FIRST": False}), ("all", {"SPAN_POST": False, "FOLD_SCALE": False, "HEAVY_FIRST": False}),
                    ("argmax", {}), ("entropy", {}), ("spans", {})]
        window = q[:, :, n - 256:]
        for name, knobs in variants:
            _set_knobs({**knobs0, **knobs})
            cs = StatsRequest(**reqs[name]).compile(256, n, torch.device("cuda"))
            ms = bench(lambda cs=cs: fused.patched_attention(window, k, v, scaling=D ** -0.5, stats=cs,
                                                             query_positions=n - 256, compute_output=False))
            rows.append({"mode": "window_breakdown", "N": n, "case": name, **knobs, "window_pass_ms": round(ms, 4),
                         "vs_cudnn_with_it": round(sdpa / (sdpa + ms), 3)})
            print(f"window N={n} {name:<8} {knobs}: window pass {1e3 * ms:8.1f} us; with SDPA x{sdpa / (sdpa + ms):.3f} cuDNN",
                  flush=True)
    _set_knobs(knobs0)


def prefill(n: int, rows: list[dict], flex_ok: bool) -> None:
    q, k, v = inputs(n, n, seed=n)
    gen = torch.Generator().manual_seed(1)
    gammas = {(0, h): float(g) for h, g in enumerate(torch.rand(H, generator=gen) * 3 + 0.2)}
    scales = {(0, h): float(s) for h, s in enumerate(torch.rand(H, generator=gen) + 0.5)}
    bias = torch.tensor([torch.log(torch.tensor(gammas[(0, h)])).item() for h in range(H)], device="cuda")
    head_scale = torch.tensor([scales[(0, h)] for h in range(H)], device="cuda", dtype=DT)
    spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
    stats_all = StatsRequest(argmax=True, entropy=True, spans=spans)
    stats_256 = StatsRequest(argmax=True, entropy=True, spans=spans, queries=slice(-256, None))
    fl = causal_flops(n, n)
    sdpa = sdpa_fn(q, k, v, True)
    base_ms = bench(sdpa)
    cases = {
        "sdpa_flash": sdpa,
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "a_none": headlab_fn(q, k, v),
        "b_bias_scale": headlab_fn(q, k, v, InterventionPlan().scale_first_token(gammas).scale_heads(scales)),
        "c_act": headlab_fn(q, k, v, InterventionPlan().act([(0, h) for h in range(H)], beta=0.4, tau=0.1)),
        "d_stats_all": headlab_fn(q, k, v, stats=stats_all),
        "d_stats_256": headlab_fn(q, k, v, stats=stats_256, window_path=True),
        "d_stats_256_fused": headlab_fn(q, k, v, stats=stats_256),
    }
    flex_ms = {}
    if flex_ok:
        try:
            plain, biased = flex_fns(q, k, v, bias, head_scale)
            cases["flex_none"], cases["flex_bias_scale"] = plain, biased
        except Exception as exc:
            print(f"flex unavailable: {exc}")
    for name, fn in cases.items():
        try:
            ms = bench(fn)
            mem = peak_gib(fn)
        except Exception as exc:
            print(f"N={n} {name}: failed {type(exc).__name__}: {exc}")
            rows.append({"mode": "prefill", "N": n, "case": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if name.startswith("flex"):
            flex_ms[name] = ms
        row = {"mode": "prefill", "N": n, "case": name, "ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 1),
               "vs_sdpa": round(base_ms / ms, 3), "peak_gib": round(mem, 3)}
        rows.append(row)
        print(f"N={n:>6} {name:<20} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s  x{row['vs_sdpa']:.3f} SDPA  peak {mem:.2f} GiB",
              flush=True)
    for r in rows:
        if r.get("N") == n and r.get("mode") == "prefill" and "ms" in r:
            if r["case"] in ("a_none",) and "flex_none" in flex_ms:
                r["vs_flex"] = round(flex_ms["flex_none"] / r["ms"], 3)
            if r["case"] in ("b_bias_scale",) and "flex_bias_scale" in flex_ms:
                r["vs_flex"] = round(flex_ms["flex_bias_scale"] / r["ms"], 3)
                print(f"N={n:>6} b_bias_scale vs FlexAttention with the same bias: x{r['vs_flex']:.3f}")


def act_breakdown(n: int, rows: list[dict]) -> None:
    """Where ACT's time goes: the QK-only lse pass, the column pass, the sink mass, the fused pass."""
    q, k, v = inputs(n, n, seed=3)
    lp = InterventionPlan().act([(0, h) for h in range(H)], beta=0.4, tau=0.1).compile_layer(0, H, D).to("cuda")
    run = fused._Launch(q, k, v, D ** -0.5, True, None, None, lp, 0)
    lse = run.forward(output=False)["lse"]
    recv, cnt = run.received(lse, 0, n)
    from headlab.kernels.reference import act_sink_sets

    sinks = act_sink_sets(recv, cnt, lp)
    parts = {
        "lse_pass": lambda: run.forward(output=False),
        "column_pass": lambda: run.received(lse, 0, n),
        "sink_sets": lambda: act_sink_sets(recv, cnt, lp),
        "sink_mass": lambda: run.sink_mass(sinks, lse),
        "plain_fused_pass": lambda: run.forward(output=True),
    }
    for name, fn in parts.items():
        ms = bench(fn)
        rows.append({"mode": "act_breakdown", "N": n, "part": name, "ms": round(ms, 4)})
        print(f"ACT N={n} {name:<18} {ms:8.3f} ms", flush=True)
    print(f"ACT N={n}: {int(sinks.sum())} sinks over {H} heads", flush=True)


def sweep_decode(rows: list[dict]) -> None:
    """Pick DECODE_BLOCKS (plain / with stats) at a 32k cache, batch 8."""
    q, k, v = (torch.randn(8, n, h, D, device="cuda", dtype=DT).transpose(1, 2) for n, h in ((1, H), (32768, HKV), (32768, HKV)))
    stats = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 4), "a": (16384, 16448),
                                                           "b": list(range(100, 32768, 2048))}).compile(1, 32768, torch.device("cuda"))
    for key, kw in (("plain", {}), ("stats", {"stats": stats})):
        best = None
        for cfg in [(64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2), (32, 2, 3), (64, 4, 3), (128, 4, 2)]:
            fused.DECODE_BLOCKS[key] = cfg
            try:
                us = bench(lambda kw=kw: fused.patched_attention(q, k, v, scaling=D ** -0.5, **kw)) * 1e3
            except Exception as exc:  # noqa: BLE001 - a config that does not fit
                print(f"sweep decode {key} {cfg}: failed ({type(exc).__name__})")
                continue
            print(f"sweep decode {key} {cfg}: {us:.1f} us", flush=True)
            rows.append({"sweep": f"decode_{key}", "config": cfg, "us": us})
            if best is None or us < best[1]:
                best = (cfg, us)
        fused.DECODE_BLOCKS[key] = best[0]
        print(f"sweep decode {key}: best {best[0]}")


def decode(cache: int, batch: int, rows: list[dict]) -> None:
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=DT).transpose(1, 2)
    k = torch.randn(batch, cache, HKV, D, device="cuda", dtype=DT).transpose(1, 2)
    v = torch.randn(batch, cache, HKV, D, device="cuda", dtype=DT).transpose(1, 2)
    gammas = {(0, h): 1.5 for h in range(H)}
    plan_b = InterventionPlan().scale_first_token(gammas).scale_heads({(0, h): 1.2 for h in range(H)})
    stats = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 4), "a": (cache // 2, cache // 2 + 64),
                                                           "b": list(range(100, cache, cache // 16))})
    cases = {
        "sdpa_flash": sdpa_fn(q, k, v, False),
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "none": headlab_fn(q, k, v),
        "b_bias_scale": headlab_fn(q, k, v, plan_b),
        "d_stats": headlab_fn(q, k, v, stats=stats),
    }
    base_ms = None
    bytes_moved = 2 * batch * cache * HKV * D * 2
    for name, fn in cases.items():
        ms = bench(fn)
        base_ms = base_ms or ms
        row = {"mode": "decode", "cache": cache, "batch": batch, "case": name, "us": round(ms * 1e3, 2),
               "gb_per_s": round(bytes_moved / ms / 1e6, 1), "vs_sdpa": round(base_ms / ms, 3)}
        rows.append(row)
        print(f"decode cache={cache:>6} B={batch} {name:<14} {row['us']:9.1f} us {row['gb_per_s']:8.1f} GB/s  x{row['vs_sdpa']:.3f} SDPA",
              flush=True)


def decode_host_overhead(rows: list[dict], profile_out: Path) -> None:
    """Host time per decode call (no synchronization): what bounds batch-1 decode on short caches."""
    import cProfile
    import pstats

    q, k, v = inputs(1, 32768)
    fns = {"sdpa_flash": sdpa_fn(q, k, v, False), "headlab_none": headlab_fn(q, k, v)}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200
        torch.cuda.synchronize()
        rows.append({"mode": "decode_host", "case": name, "host_us_per_call": round(host * 1e6, 1)})
        print(f"decode host overhead {name}: {host * 1e6:.1f} us/call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        fns["headlab_none"]()
    prof.disable()
    torch.cuda.synchronize()
    with open(profile_out, "w") as fh:
        pstats.Stats(prof, stream=fh).sort_stats("tottime").print_stats(25)
    print(f"decode host profile: {profile_out}")


def end_to_end(rows: list[dict], tokens: int, layers: int) -> None:
    from retrieval_bench import llama3_8b_shaped

    model = llama3_8b_shaped(layers)
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")
    req = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 4), "middle": (tokens // 2, tokens // 2 + 64),
                                                         "needle": list(range(100, tokens, tokens // 16))},
                       queries=slice(-256, None))

    def plain():
        with torch.no_grad():
            return model.model(input_ids=ids, logits_to_keep=1)

    def patched():
        with torch.no_grad(), model.patched(None, req) as rec:
            model.model(input_ids=ids, logits_to_keep=1)
        return rec

    for fn in (plain, patched):  # warm-up
        fn()
    times = {}
    for name, fn in (("sdpa_forward", plain), ("patched_forward_stats256", patched)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
        times[name] = sorted(t)[1]
        rows.append({"mode": "e2e", "case": name, "tokens": tokens, "layers": layers, "s": round(times[name], 4),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        print(f"e2e {name}: {times[name]:.3f} s, peak {rows[-1]['peak_gib']} GiB", flush=True)
    ratio = times["patched_forward_stats256"] / times["sdpa_forward"]
    rows.append({"mode": "e2e", "case": "ratio", "patched_over_sdpa": round(ratio, 3)})
    print(f"e2e patched / SDPA = {ratio:.3f}")


def main() -> None:
    from record import emit, header

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--caches", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--sweep", action="store_true", help="time block configs first and use the best")
    ap.add_argument("--sweep-decode", action="store_true", help="time decode block configs first and use the best")
    ap.add_argument("--sweep-stats", action="store_true", help="time the stats pass's block configs first and use the best")
    ap.add_argument("--stats-breakdown", action="store_true",
                    help="time case (d)'s pass per stat and per SPAN_POST / HEAVY_FIRST / FOLD_SCALE / block shape first")
    ap.add_argument("--window-breakdown", action="store_true",
                    help="time case (d) on the last 256 queries per stat and per knob first")
    ap.add_argument("--hopper-breakdown", action="store_true",
                    help="time the prefill pass with / without tensor descriptors (KV_DESC) per block shape first")
    ap.add_argument("--span-breakdown", action="store_true",
                    help="time case (d) per SPAN_CHUNK (the key-set masses after the main loop) first")
    ap.add_argument("--rounds", type=int, default=1, help="with --hopper-breakdown: repeat each size's cases")
    ap.add_argument("--no-block-shapes", action="store_true", help="with --hopper-breakdown: the module's block shapes only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--e2e-tokens", type=int, default=32768)
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--prefill-only", action="store_true", help="the prefill table and ACT's breakdown, no decode")
    args = ap.parse_args()
    rows: list[dict] = []
    result = {**header(), "triton": triton.__version__, "shape": f"B=1 H={H} Hkv={HKV} d={D} {DT} causal", "rows": rows}
    if args.sweep:
        sweep(rows)
    if args.sweep or args.sweep_decode:
        sweep_decode(rows)
    if args.sweep or args.sweep_stats:
        sweep_stats(rows)
    if args.stats_breakdown:
        stats_breakdown(args.sizes, rows)
    if args.window_breakdown:
        window_breakdown(args.sizes, rows)
    if args.hopper_breakdown:
        hopper_breakdown(args.sizes, rows, args.rounds, not args.no_block_shapes)
    if args.span_breakdown:
        span_breakdown(args.sizes, rows, max(2, args.rounds))
    result["blocks"] = {"prefill": fused.PREFILL_BLOCKS[D], "stats": fused.STATS_BLOCKS[D], "qk_only": fused.QK_ONLY_BLOCKS[D],
                        "colsum": fused.COLSUM_BLOCKS[D], "decode": fused.DECODE_BLOCKS}
    if not args.skip_kernels:
        for n in args.sizes:
            prefill(n, rows, not args.no_flex)
        act_breakdown(16384, rows)
        if not args.prefill_only:
            for cache in args.caches:
                for batch in (1, 8):
                    decode(cache, batch, rows)
            decode_host_overhead(rows, args.out.with_suffix(".decode_profile.txt"))
    if args.e2e:
        end_to_end(rows, args.e2e_tokens, args.e2e_layers)
    emit(result, args.out)


if __name__ == "__main__":
    main()
