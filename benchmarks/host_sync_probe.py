"""Which lines of a patched forward make the host wait for the GPU (a diagnostic, one GPU).

    python benchmarks/host_sync_probe.py --out benchmarks/results/host_sync_probe_h100.json

A copy from pageable host memory to the GPU, a copy back, or an explicit synchronization stops
the host until the GPU has caught up, so the host can no longer queue work ahead: every later
launch's host time becomes GPU idle time. For a 1k-token prefill of the 32-layer Llama-3-8B shape
(random weights, bf16) under each plan / stats request of `decode_graph_bench.py`, and for the
calibrated ACT route's call at 4k, this records (torch.profiler, with Python stacks) each such
event and the headlab line that made it, the forward's wall and GPU time, and where its host
time goes (cProfile, by own time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_graph_bench import LAYERS, RETRIEVAL, act_adaptive, act_calibrated, zerotuning  # noqa: E402
from record import emit, header  # noqa: E402

WAITS = ("Pageable", "DtoH", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def headlab_line(stack: list[str]) -> str:
    """The innermost frame of headlab (or its kernels) in a profiler stack, else the innermost frame."""
    for frame in stack:
        if "headlab" in frame or "kernels/" in frame:
            return frame
    return stack[0] if stack else "?"


def waits(fn) -> tuple[list[dict], float, float]:
    """(the host waits of one call of fn, its wall ms, its GPU ms)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    found: dict[tuple[str, str], int] = {}
    gpu_us = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us += ev.time_range.elapsed_us()
            continue
        names = [k.name for k in getattr(ev, "kernels", [])] + [ev.name]
        hit = next((n for n in names if any(w in n for w in WAITS)), None)
        if hit is None:
            continue
        op = ev
        while op is not None and not op.stack:
            op = op.cpu_parent
        key = (hit[:60], headlab_line(op.stack if op is not None else []))
        found[key] = found.get(key, 0) + 1
    return [{"event": e, "line": line, "count": n} for (e, line), n in sorted(found.items(), key=lambda x: -x[1])], wall, gpu_us / 1e3


def host_profile(fn, top: int = 12, calls: int = 1) -> list[dict]:
    """The functions where `calls` calls of fn spend their host time (cProfile, by own time; ms per call)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((v[2], v[3], v[0], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in st.stats.items()), reverse=True)
    return [{"function": name, "own_ms": round(own * 1e3 / calls, 3), "cum_ms": round(cum * 1e3 / calls, 3),
             "calls": n / calls} for own, cum, n, name in rows[:top]]


def decode_calls(rows: list[dict], n: int = 32768, calls: int = 200) -> None:
    """Where an eager decode call's host time goes (one attention call at a 32k cache, as a step
    of `generate()` makes it with each plan / stats request): wall µs per call and cProfile."""
    from types import SimpleNamespace

    from decode_graph_bench import D, H, HKV, RICH, per_call, step_inputs

    from headlab import attention
    from headlab.plan import InterventionPlan

    q, k, v, mask = step_inputs(n)
    cases = {"plain": (None, None), "zerotuning": (zerotuning(1), None), "act_calibrated": (act_calibrated(1), None),
             "act_adaptive": (act_adaptive(1), None), "stats_argmax": (None, RETRIEVAL), "stats_rich": (None, RICH)}
    for name, (plan, request) in cases.items():
        module = SimpleNamespace(layer_idx=0, is_causal=True, training=False, num_key_value_groups=H // HKV)
        session = attention.PatchSession(plan=plan or InterventionPlan(), request=request, n_heads=H, head_dim=D)
        setattr(module, attention.SESSION_ATTR, session)

        def call(module=module, session=session):
            session._seen.clear()  # the same step again: no new positions to track
            return attention.headlab_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)

        us = per_call(call, calls)
        top = host_profile(call, top=15, calls=calls)
        rows.append({"case": f"eager decode call 32k {name}", "wall_us_per_call": round(us, 1), "host_top": top})
        print(f"eager decode call {name:<15} {us:7.1f} us", flush=True)
        for f in top[:10]:
            print(f"    host {f['own_ms'] * 1e3:7.1f} us own, {f['calls']:>5g} calls  {f['function']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only-decode-calls", action="store_true", help="only where eager decode calls spend host time")
    args = ap.parse_args()
    if args.only_decode_calls:
        rows: list[dict] = []
        decode_calls(rows)
        emit({**header(), "command": " ".join(sys.argv), "rows": rows}, args.out)
        return
    from retrieval_bench import llama3_8b_shaped

    rows = []
    model = llama3_8b_shaped(LAYERS)
    ids = torch.randint(3, 128000, (1, 1024), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    cases = {"plain": (None, None), "zerotuning": (zerotuning(LAYERS), None), "act_calibrated": (act_calibrated(LAYERS), None),
             "act_adaptive": (act_adaptive(LAYERS), None), "retrieval": (None, RETRIEVAL)}
    for name, (plan, request) in cases.items():
        def forward(m=model, plan=plan, request=request):
            with torch.no_grad(), m.patched(plan, request):
                m.model(input_ids=ids, use_cache=True, logits_to_keep=1)

        found, wall, gpu = waits(forward)
        rows.append({"case": f"prefill 1k {name}", "wall_ms": round(wall, 2), "gpu_ms": round(gpu, 2), "waits": found,
                     "host_top": host_profile(forward)})
        print(f"prefill 1k {name:<15} wall {wall:6.1f} ms  GPU {gpu:6.1f} ms  waits {sum(f['count'] for f in found)}", flush=True)
        for f in found:
            print(f"    x{f['count']:<4} {f['event']:<40} {f['line']}", flush=True)
        for f in rows[-1]["host_top"][:6]:
            print(f"    host {f['own_ms']:7.2f} ms own, {f['calls']:>5} calls  {f['function']}", flush=True)
    del model
    torch.cuda.empty_cache()
    from headlab.kernels import act_sparse

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for h in (32, 8, 8))
    lp = act_calibrated(1).compile_layer(0, 32, 128).to("cuda")
    found, wall, gpu = waits(lambda: act_sparse.attend(q, k, v, lp, 128 ** -0.5, True))
    rows.append({"case": "calibrated ACT route, one call at 4k", "wall_ms": round(wall, 3), "gpu_ms": round(gpu, 3), "waits": found})
    print(f"calibrated ACT call 4k wall {wall:6.3f} ms  GPU {gpu:6.3f} ms  waits {sum(f['count'] for f in found)}", flush=True)
    for f in found:
        print(f"    x{f['count']:<4} {f['event']:<40} {f['line']}", flush=True)
    emit({**header(), "command": " ".join(sys.argv), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
