"""Driver for Nsight Compute: one launch of each kernel where kernels/bench.py misses a target.

    ncu --profile-from-start off --clock-control none --csv --metrics <list> python3 kernels/profile_ncu.py [case ...]

Compiles and warms every case first, then runs each once between cudaProfilerStart/Stop, so ncu
sees exactly: cuDNN SDPA and the Triton forward at 16k (case a), the forward with stats at 16k
(case d), with its argmax alone and with its entropy and key sets alone, ACT's column pass at 16k,
and decode at a 32k cache, batch 8, plain and with stats. Cases ending in `_ptr` run with
`fused.KV_DESC` off (key / value blocks through pointer loads, not tensor descriptors). Names on the
command line keep only those cases.
"""

from __future__ import annotations

import sys

import torch
from headlab.kernels import fused

from headlab.stats import StatsRequest

H, HKV, D = 32, 8, 128


def _pointer_loads(fn):
    def run():
        fused.KV_DESC = False
        try:
            return fn()
        finally:
            fused.KV_DESC = True
    return run


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(b, nq, nk):
        return (torch.randn(b, n, h, D, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)
                for n, h in ((nq, H), (nk, HKV), (nk, HKV)))

    n = 16384
    q, k, v = qkv(1, n, n)
    spans = {"first": (0, 4), "middle": (n // 2, n // 2 + 64), "needle": list(range(100, n, n // 16))}
    stats = StatsRequest(argmax=True, entropy=True, spans=spans).compile(n, n, dev)
    argmax_only = StatsRequest(argmax=True).compile(n, n, dev)
    no_argmax = StatsRequest(entropy=True, spans=spans).compile(n, n, dev)
    argmax_entropy = StatsRequest(argmax=True, entropy=True).compile(n, n, dev)
    run = fused._Launch(q, k, v, D ** -0.5, True, None, None, None, 0)
    lse = run.forward(output=False)["lse"]
    dq, dk, dv = qkv(8, 1, 32768)
    dstats = StatsRequest(argmax=True, entropy=True, spans={"first": (0, 4), "a": (16384, 16448),
                                                            "b": list(range(100, 32768, 2048))}).compile(1, 32768, dev)
    cases = [
        ("sdpa_default", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("a_none", lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5)),
        ("d_stats_all", lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=stats)),
        ("d_argmax_only", lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=argmax_only)),
        ("d_entropy_spans", lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=no_argmax)),
        ("d_argmax_entropy", lambda: fused.patched_attention(q, k, v, scaling=D ** -0.5, stats=argmax_entropy)),
        ("colsum", lambda: run.received(lse, 0, n)),
        ("decode_none", lambda: fused.patched_attention(dq, dk, dv, scaling=D ** -0.5)),
        ("decode_stats", lambda: fused.patched_attention(dq, dk, dv, scaling=D ** -0.5, stats=dstats)),
    ]
    cases += [(name + "_ptr", _pointer_loads(fn)) for name, fn in cases if name.startswith(("a_", "d_"))]
    if sys.argv[1:]:
        cases = [c for c in cases if c[0] in sys.argv[1:]]
    for _, fn in cases:
        fn()
        fn()
    torch.cuda.synchronize()
    for name, fn in cases:
        torch.cuda.nvtx.range_push(name)
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        torch.cuda.nvtx.range_pop()
        print(f"profiled {name}", flush=True)


if __name__ == "__main__":
    main()
