"""Per-head attention stats inside a TransformerLens bridge: headlab's patched attention vs TL's
own `run_with_cache` pattern extraction, at the Llama-3-8B shape (random weights, bf16), in one
run (issue 17).

- TL: the bridge as TransformerLens boots it (eager attention), `run_with_cache` filtered to every
  layer's `hook_pattern`, then per-head entropy, first-token mass and argmax per query computed
  from the cached patterns — what a TL user writes. Where it does not fit, the out-of-memory
  error is recorded.
- headlab: the same bridge after `headlab.load_model(bridge)` (attention routed through headlab),
  one forward inside `patched(None, StatsRequest(entropy, argmax, first-token span))`: the same
  numbers, never the N×N matrix.
Both run under torch.no_grad() (with gradients on, the bridge's forward alone keeps a 25 GiB autograd
graph at 4k tokens, measured); both get one warm-up; each is timed once per length with the peak
GPU memory its call adds to the loaded model.

    python benchmarks/bridge_stats_bench.py --out benchmarks/results/bridge_stats_bench_h100.json
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

import headlab
from headlab import StatsRequest
from headlab.zoo import corpus
from record import emit, header
from retrieval_bench import llama3_8b_shaped


def timed(fn):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}, None
    torch.cuda.synchronize()
    return {"seconds": round(time.perf_counter() - t0, 3),
            "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}, out


def tl_stats(bridge, ids):
    """Entropy, first-token mass, argmax [L, H, N] from TL's cached patterns."""
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"), return_type=None)
    ent, first, arg = [], [], []
    for layer in range(bridge.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][0].float()  # [H, N, N]
        ent.append(torch.special.entr(p).sum(-1))
        first.append(p[..., 0])
        arg.append(p.argmax(-1))
        del p
    del cache
    return torch.stack(ent), torch.stack(first), torch.stack(arg)


def headlab_stats(model, bridge, ids):
    request = StatsRequest(entropy=True, argmax=True, spans={"first": (0, 1)})
    with model.patched(None, request) as rec, torch.no_grad():
        bridge(ids, return_type=None)
    return rec.stats.entropy[:, 0], rec.stats.span_mass("first")[:, 0], rec.stats.argmax[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformer_lens.model_bridge import TransformerBridge

    hm = llama3_8b_shaped(args.layers)
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(corpus.__file__).parent / "pycode-llama"))
    source = Path(tempfile.mkdtemp()) / "llama3-8b-shaped"
    hm.model.config.save_pretrained(source)
    hm.model.config._attn_implementation = "eager"
    device = hm.device
    bridge = TransformerBridge.boot_transformers(str(source), hf_model=hm.model, tokenizer=tok, device=device,
                                                 dtype=hm.dtype)
    rows = {}
    tl_results = {}
    for n in args.tokens:
        ids = torch.randint(0, hm.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        tl_stats(bridge, ids[:, :256])  # warm up
        info, out = timed(lambda: tl_stats(bridge, ids))
        rows[n] = {"transformer_lens_run_with_cache": info}
        tl_results[n] = None if out is None else [t.cpu() for t in out]
        del out
    model = headlab.load_model(bridge)  # the same bridge, attention now headlab's
    for n in args.tokens:
        ids = torch.randint(0, hm.spec.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        headlab_stats(model, bridge, ids[:, :256])
        info, out = timed(lambda: headlab_stats(model, bridge, ids))
        rows[n]["headlab_in_bridge"] = info
        if out is not None and tl_results.get(n) is not None:
            ours = [t.float().cpu() for t in out]
            theirs = tl_results[n]
            # Layer 0 sees identical inputs on both paths; later layers add bf16 differences that 32 random
            # layers amplify (TL's eager bf16 scores vs headlab's fp32 accumulation).
            for where, sl in (("layer_0", slice(0, 1)), ("all_layers", slice(None))):
                rows[n][f"max_abs_diff_{where}"] = {"entropy": float((ours[0][sl] - theirs[0][sl]).abs().max()),
                                                    "first_token_mass": float((ours[1][sl] - theirs[1][sl]).abs().max())}
                rows[n][f"argmax_agreement_{where}"] = float((ours[2][sl] == theirs[2][sl].to(ours[2].device)).float().mean())
        tl_info = rows[n]["transformer_lens_run_with_cache"]
        if "seconds" in tl_info and "seconds" in info:
            rows[n]["time_ratio_tl_over_headlab"] = round(tl_info["seconds"] / info["seconds"], 2)
            rows[n]["memory_ratio_tl_over_headlab"] = round(tl_info["peak_extra_gib"] / max(info["peak_extra_gib"], 1e-3), 1)
    result = {
        **header(),
        "model": f"Llama-3-8B shape, {args.layers} layers, 32 q / 8 kv heads, d=128, bf16, random weights",
        "stats": "per head and query: entropy, first-token mass, argmax key (all layers, all queries)",
        "transformer_lens": __import__("transformer_lens").__version__ if hasattr(__import__("transformer_lens"), "__version__") else "4.3",
        "by_tokens": rows,
        "command": "python benchmarks/bridge_stats_bench.py --out benchmarks/results/bridge_stats_bench_h100.json",
        "seed": 0,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
