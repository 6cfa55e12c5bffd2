"""Decode with a plan or stats at GPU speed: the decode step replayed from a CUDA graph
(`headlab.decode.greedy_decode`) against plain `generate()`, on one GPU.

    python benchmarks/decode_graph_bench.py --out benchmarks/results/decode_graph_bench_h100.json

Llama-3-8B shapes, bf16, batch 1. Two parts:
- one attention call of a decode step at a 32k (and a 1k) cache, as the graphed decoder's static
  cache holds it (the keys + 16 free slots, with its key mask): plain SDPA as `generate()` calls it
  (no mask, only the keys), eagerly and captured; SDPA over the static cache with the key mask;
  the plain attention function on that call (`plain_masked`: transformers' SDPA path, or the
  Triton decode kernel past 4k keys; `..._in_decode_steps`: as `headlab.decode` runs it); the
  patched call under a ZeroTuning plan, a calibrated ACT plan, the paper's input-adaptive ACT,
  retrieval stats (argmax) and stats (argmax + entropy + a span). Each eagerly (host-bound) and captured. Ratios: SDPA's eager call
  time (what a decode step of `generate()` costs) / the call's time, and the same against SDPA captured.
- end to end on a 32-layer Llama-3-8B-shaped model (random weights): 1k prompt + 64 new tokens
  with each plan / retrieval scoring, `generate()` eagerly and `greedy_decode` with the graph;
  32k prompt + 16 new tokens with retrieval stats. Interleaved rounds, medians (the host drifts).
Tokens of the graphed decoder are compared with the same steps run eagerly (`cuda_graph=False`:
must be equal) and with `generate()` under the same session (random bf16 weights: near-tied
logits, so the dynamic cache's kernels and the static cache's part ways after a few tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import headlab  # noqa: E402
from headlab import attention  # noqa: E402
from headlab.decode import greedy_decode  # noqa: E402
from headlab.plan import InterventionPlan  # noqa: E402

from record import emit, header, interleaved  # noqa: E402

H, HKV, D, LAYERS = 32, 8, 128, 32
DT = torch.bfloat16


def zerotuning(layers: int) -> InterventionPlan:
    return InterventionPlan().scale_first_token({(l, h): 1.5 for l in range(layers) for h in range(0, H, 4)})


def act_calibrated(layers: int) -> InterventionPlan:
    return InterventionPlan().act_with_sinks({(l, h): [3 + h, 40 + 7 * h] for l in range(layers) for h in range(0, H, 2)})


def act_adaptive(layers: int) -> InterventionPlan:
    """The paper's ACT: sink sets found on each input (τ = 0.1), every other head."""
    return InterventionPlan().act([(l, h) for l in range(layers) for h in range(0, H, 2)], beta=0.4, tau=0.1)


RETRIEVAL = headlab.StatsRequest(argmax=True, queries=slice(-1, None))
RICH = headlab.StatsRequest(argmax=True, entropy=True, spans={"start": (0, 64)}, queries=slice(-1, None))


def per_call(fn, calls: int = 300) -> float:
    """Wall microseconds per call over `calls` back-to-back calls (host and GPU overlap, as in decoding)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def captured(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream): the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_inputs(n: int, free: int = 16):
    """One decode step as the graphed decoder's static cache holds it: q [1, H, 1, D], k / v
    [1, HKV, n + free, D] (seed 0) and the key mask [1, 1, 1, n + free] (the first n + 1 keys seen)."""
    L = n + free
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, 1, D, device="cuda", dtype=DT, generator=g)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=DT, generator=g)
    mask = torch.zeros(1, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[..., : n + 1] = True
    return q, k, v, mask


def attention_calls(rows: list[dict], n: int, free: int = 16) -> None:
    q, k, v, mask = step_inputs(n, free)
    k_dyn, v_dyn = k[:, :, : n + 1].contiguous(), v[:, :, : n + 1].contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(q, k_dyn, v_dyn, enable_gqa=True)

    def sdpa_masked():  # the same step over the static cache's L slots with its key mask, as SDPA runs it
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def plain_masked():  # the plain attention function on that call (no session): the Triton decode kernel past 4k keys
        return attention.headlab_attention_forward(plain_module, q, k, v, mask, scaling=D ** -0.5)

    def plain_masked_steps():  # the same inside headlab.decode's steps: the Triton decode kernel at any length
        with attention.static_decode_steps():
            return plain_masked()

    plain_module = SimpleNamespace(layer_idx=0, is_causal=True, training=False, num_key_value_groups=H // HKV)
    eager_sdpa = per_call(sdpa)
    results = {"sdpa": (eager_sdpa, per_call(captured(sdpa))),
               "sdpa_masked": (per_call(sdpa_masked), per_call(captured(sdpa_masked))),
               "plain_masked": (per_call(plain_masked), per_call(captured(plain_masked))),
               "plain_masked_in_decode_steps": (per_call(plain_masked_steps), per_call(captured(plain_masked_steps)))}
    cases = {"zerotuning": (zerotuning(1), None), "act_calibrated": (act_calibrated(1), None),
             "act_adaptive": (act_adaptive(1), None),
             "stats_argmax": (None, RETRIEVAL), "stats_argmax_entropy_span": (None, RICH)}
    for name, (plan, request) in cases.items():
        module = SimpleNamespace(layer_idx=0, is_causal=True, training=False, num_key_value_groups=H // HKV)
        session = attention.PatchSession(plan=plan or InterventionPlan(), request=request, n_heads=H, head_dim=D)
        setattr(module, attention.SESSION_ATTR, session)

        def call(module=module):
            return attention.headlab_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)

        results[name] = (per_call(call, 100), per_call(captured(call)))
    for name, (eager, graphed) in results.items():
        rows.append({"mode": "decode_call", "keys": n, "case": name, "eager_us": round(eager, 1), "graphed_us": round(graphed, 1),
                     "vs_sdpa_eager": round(eager_sdpa / graphed, 3),
                     "vs_sdpa_graphed": round(results["sdpa"][1] / graphed, 3)})
        print(f"decode K={n} {name:<26} eager {eager:7.1f} us  graphed {graphed:7.1f} us  "
              f"x{eager_sdpa / graphed:.2f} of SDPA's eager call", flush=True)


def phases(fn) -> dict:
    """Where one run of `fn` (a greedy_decode) spends its time: headlab.decode's DEBUG timings
    (prefill, static cache, first step, capture, replays; a device sync at each mark)."""
    import logging

    got: dict = {}

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.args:
                got.update(record.args[0] if isinstance(record.args, tuple) else record.args)

    logger = logging.getLogger("headlab.decode")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return got


def teacher_forced(model, tokens: torch.Tensor, prompt: int, plan, request) -> dict:
    """One forward over the decoded sequence under the same plan (the prefill's kernels): at each new
    position, whether the decoded token is that forward's argmax, and where not, how far its logit
    is below the argmax's — bf16 rounding between two correct paths, on a near-flat distribution."""
    with model.patched(plan, None):
        logits = model(tokens[:, :-1], logits_to_keep=tokens.shape[1] - prompt).logits[0].float()  # [new, V]
    chosen = tokens[0, prompt:]
    gap = logits.max(-1).values - logits.gather(-1, chosen[:, None])[:, 0]
    top2 = logits.topk(2, -1).values
    return {"argmax_agrees": f"{int((gap == 0).sum())}/{chosen.numel()}", "max_gap": round(float(gap.max()), 4),
            "median_top1_top2_gap": round(float((top2[:, 0] - top2[:, 1]).median()), 4),
            "logit_std": round(float(logits.std()), 3)}


def sweep_adaptive(rows: list[dict]) -> None:
    """Time the block choices of the input-adaptive ACT decode call (captured, 32k keys with the
    static cache's key mask): first `act_sparse.ADAPTIVE_LOGIT_BLOCKS` (the pass over the keys),
    then `ADAPTIVE_DECODE_BLOCKS` (the pass over the values, and the splits); set the best of each."""
    import itertools

    from headlab.kernels import act_sparse

    plan = act_adaptive(1).compile_layer(0, H, D).to("cuda")
    n = 32768
    q, k, v, mask = step_inputs(n)
    # the first sweep (27 + 54 choices, recorded in the results) left these neighbourhoods
    grids = {"ADAPTIVE_LOGIT_BLOCKS": itertools.product((64, 128), (4, 8), (3, 4)),
             "ADAPTIVE_DECODE_BLOCKS": itertools.product((64, 128), (2, 4, 8), (2, 3), (1, 2, 4))}
    for name, grid in grids.items():
        results = []
        for cfg in grid:
            setattr(act_sparse, name, cfg)
            try:
                us = per_call(captured(lambda: act_sparse.decode_adaptive(q, k, v, plan, D ** -0.5, mask)))
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (shared memory)
                print(f"{name} K={n} {cfg}: {type(exc).__name__}", flush=True)
                continue
            results.append((cfg, us))
            rows.append({"mode": "sweep_adaptive", "blocks_of": name, "keys": n, "blocks": list(cfg), "graphed_us": round(us, 1)})
            print(f"{name} K={n} {cfg}: {us:.1f} us", flush=True)
        best = min(results, key=lambda r: r[1])
        setattr(act_sparse, name, best[0])
        rows.append({"mode": "sweep_adaptive", "blocks_of": name, "best_at_32k": list(best[0]), "graphed_us": round(best[1], 1)})
        print(f"{name} best at 32k: {best[0]} {best[1]:.1f} us", flush=True)


def adaptive_kernel_times(rows: list[dict], n: int = 32768, calls: int = 50) -> None:
    """Where the input-adaptive ACT decode call's time goes: GPU time per kernel (torch.profiler,
    `calls` eager calls at `n` keys with the static cache's key mask), next to SDPA's own kernel."""
    from torch.profiler import ProfilerActivity, profile

    from headlab.kernels import act_sparse

    plan = act_adaptive(1).compile_layer(0, H, D).to("cuda")
    q, k, v, mask = step_inputs(n)
    k_dyn, v_dyn = k[:, :, : n + 1].contiguous(), v[:, :, : n + 1].contiguous()
    for name, fn in (("act_adaptive", lambda: act_sparse.decode_adaptive(q, k, v, plan, D ** -0.5, mask)),
                     ("sdpa", lambda: F.scaled_dot_product_attention(q, k_dyn, v_dyn, enable_gqa=True))):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            dev = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if dev and ev.count >= calls:
                us = dev / ev.count
                rows.append({"mode": "kernel_time", "call": name, "keys": n, "kernel": ev.key[:80], "us_per_call": round(us, 1)})
                print(f"kernel time {name} K={n}: {ev.key[:60]:<60} {us:7.1f} us", flush=True)


def prefill_profile(rows: list[dict], prompt: int, cases: dict) -> None:
    """Where a 1k-token prefill's time goes under each plan: wall time of the forward (synchronized)
    and its GPU time per kernel (torch.profiler), on the 32-layer 8B shape."""
    from torch.profiler import ProfilerActivity, profile

    from retrieval_bench import llama3_8b_shaped

    model = llama3_8b_shaped(LAYERS)
    ids = torch.randint(3, 128000, (1, prompt), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    for name, (plan, request) in cases.items():
        def forward(m=model, plan=plan, request=request):
            with torch.no_grad(), m.patched(plan, request):
                m.model(input_ids=ids, use_cache=True, logits_to_keep=1)

        for _ in range(3):
            forward()
        torch.cuda.synchronize()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        kernels = sorted(((getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0), ev.count, ev.key)
                          for ev in prof.key_averages()), reverse=True)
        gpu_ms = sum(k[0] for k in kernels if k[1]) / 1e3
        row = {"mode": "prefill_profile", "prompt": prompt, "case": name, "wall_ms_median": round(sorted(walls)[2] * 1e3, 2),
               "gpu_ms_profiled": round(gpu_ms, 2),
               "top_kernels": [{"kernel": k[2][:70], "calls": k[1], "us": round(k[0], 1)} for k in kernels[:8]]}
        rows.append(row)
        print(f"prefill {prompt} {name:<16} wall {row['wall_ms_median']:.1f} ms, GPU {gpu_ms:.1f} ms  "
              + "; ".join(f"{k['kernel'][:40]} x{k['calls']} {k['us'] / 1e3:.2f} ms" for k in row["top_kernels"][:5]), flush=True)
    del model
    torch.cuda.empty_cache()


def end_to_end(rows: list[dict], prompt: int, new: int, cases: dict, rounds: int) -> None:
    from retrieval_bench import llama3_8b_shaped

    model = llama3_8b_shaped(LAYERS)
    # no id 0: generate() reads the pad id (0 here) in a prompt as padding and masks it
    ids = torch.randint(3, 128000, (1, prompt), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def hf(plan, request):
        with model.patched(plan, request):
            return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def graphed(plan, request):
        with model.patched(plan, request):
            return greedy_decode(model, ids, new, eos_token_id=[], cuda_graph=True)

    configs = {}
    for name, (plan, request) in cases.items():
        configs[f"{name}_generate"] = lambda plan=plan, request=request: hf(plan, request)
        configs[f"{name}_graphed"] = lambda plan=plan, request=request: graphed(plan, request)
    outputs = {name: fn() for name, fn in configs.items()}  # warm every path before timing any
    eager_steps = {}  # the same steps without the graph: the graph must give exactly these tokens
    for name, (plan, request) in cases.items():
        with model.patched(plan, request):
            eager_steps[name] = greedy_decode(model, ids, new, eos_token_id=[], cuda_graph=False)
    med, samples = interleaved(configs, rounds)
    breakdown = {name: phases(configs[name]) for name in configs if name.endswith("_graphed")}
    base = med["plain_generate"]
    for name, sec in med.items():
        case = name.rsplit("_", 1)[0]
        row = {"mode": "e2e", "prompt": prompt, "new_tokens": new, "case": name, "s_median": round(sec, 4),
               "vs_plain_generate": round(sec / base, 3), "samples_s": [round(x, 4) for x in samples[name]]}
        if name.endswith("_graphed"):
            row["vs_plain_graphed"] = round(sec / med["plain_graphed"], 3)
            row["same_tokens_as_eager_steps"] = bool(torch.equal(outputs[name], eager_steps[case]))
            row["same_tokens_as_generate"] = bool(torch.equal(outputs[name], outputs[f"{case}_generate"]))
            differ = (outputs[name][0, prompt:] != outputs[f"{case}_generate"][0, prompt:]).nonzero()
            row["new_tokens_equal_to_generate_before_first_difference"] = int(differ[0, 0]) if differ.numel() else new
            row["teacher_forced_check"] = teacher_forced(model, outputs[name], prompt, *cases[case])
            row["phases_s"] = breakdown[name]
        rows.append(row)
        print(f"e2e {prompt}+{new} {name:<28} {sec:.3f} s  x{sec / base:.3f} of plain generate"
              + (f"  x{sec / med['plain_graphed']:.3f} of plain graphed; tokens = eager steps: "
                 f"{row['same_tokens_as_eager_steps']}, = generate for "
                 f"{row['new_tokens_equal_to_generate_before_first_difference']}/{new}, teacher-forced "
                 f"{row['teacher_forced_check']}" if name.endswith("_graphed") else ""),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-long", action="store_true", help="skip the 32k + 16 run")
    ap.add_argument("--sweep-adaptive", action="store_true", help="first pick act_sparse.ADAPTIVE_LOGIT_BLOCKS and ADAPTIVE_DECODE_BLOCKS")
    ap.add_argument("--only-calls", action="store_true", help="the decode calls only, no generation")
    ap.add_argument("--profile-prefill", action="store_true", help="first profile a 1k prefill under each plan")
    args = ap.parse_args()
    rows: list[dict] = []
    if args.sweep_adaptive:
        sweep_adaptive(rows)
    adaptive_kernel_times(rows)
    attention_calls(rows, 32768)
    attention_calls(rows, 1024)
    if args.only_calls:
        emit({**header(), "command": " ".join(sys.argv), "shape": "Llama-3-8B: 32 q / 8 kv heads, d=128, bf16, batch 1",
              "seed": 0, "rows": rows}, args.out)
        return
    short = {"plain": (None, None), "zerotuning": (zerotuning(LAYERS), None),
             "act_calibrated": (act_calibrated(LAYERS), None), "act_adaptive": (act_adaptive(LAYERS), None),
             "retrieval": (None, RETRIEVAL)}
    if args.profile_prefill:
        prefill_profile(rows, 1024, short)
    end_to_end(rows, 1024, 64, short, args.rounds)
    torch.cuda.empty_cache()  # the first model is gone with end_to_end's frame
    if not args.skip_long:
        end_to_end(rows, 32768, 16, {"plain": (None, None), "retrieval": (None, RETRIEVAL)}, max(2, args.rounds - 1))
    emit({**header(), "command": " ".join(sys.argv), "shape": "Llama-3-8B: 32 q / 8 kv heads, d=128, bf16, batch 1",
          "seed": 0, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
