"""Retrieval scoring cost on a Llama-3-8B-shaped model (random weights), against plain generate().

Issue 5's benchmark: one 32k-token sample; retrieval scoring = greedy generate() inside
`patched(None, StatsRequest(argmax=True, queries=slice(-1, None)))` (argmax per head of the last
prefill row and of every decode step) — vs the same generate() with no session (SDPA). Prints
and writes wall time, the ratio, and peak GPU memory.

    python benchmarks/retrieval_bench.py --out benchmarks/results/retrieval_bench_h100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import headlab
from headlab import attention
from headlab.model import HeadModel
from headlab.spec import ModelSpec
from record import emit, header


def llama3_8b_shaped(layers: int) -> HeadModel:
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        architectures=["LlamaForCausalLM"],
    )
    attention.register()
    config._attn_implementation = attention.ATTN_IMPLEMENTATION
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = attention.ATTN_IMPLEMENTATION
    return HeadModel(model=model, tokenizer=None, spec=ModelSpec.from_config(config), name="llama3-8b-shaped (random)")


def timed(fn) -> tuple[float, float, object]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = llama3_8b_shaped(args.layers)
    ids = torch.randint(0, 128000, (1, args.tokens), device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    request = headlab.StatsRequest(argmax=True, queries=slice(-1, None))

    def plain():
        return model.generate(ids, **kw)

    def scored():
        with model.patched(None, request) as rec:
            out = model.generate(ids, **kw)
        return out, rec.stats.argmax.shape

    model.generate(ids[:, :512], **kw)  # warm up kernels and the allocator
    with model.patched(None, request):
        model.generate(ids[:, :512], **kw)
    runs = {"plain_generate": [], "retrieval_scoring": []}
    peaks = {"plain_generate": 0.0, "retrieval_scoring": 0.0}
    shape = None
    for _ in range(args.repeats):
        for name, fn in (("plain_generate", plain), ("retrieval_scoring", scored)):
            seconds, peak, out = timed(fn)
            runs[name].append(round(seconds, 3))
            peaks[name] = max(peaks[name], peak)
            if name == "retrieval_scoring":
                shape = list(out[1])
    best = {k: min(v) for k, v in runs.items()}
    result = {
        **header(),
        "model": f"Llama-3-8B shape, {args.layers} layers, 32 q / 8 kv heads, d=128, bf16, random weights",
        "prompt_tokens": args.tokens, "new_tokens": args.new_tokens, "kernel": "reference (exact PyTorch) for stat rows, SDPA otherwise",
        "seconds": runs, "best_seconds": best, "ratio_scoring_over_plain": round(best["retrieval_scoring"] / best["plain_generate"], 3),
        "peak_gib": {k: round(v, 2) for k, v in peaks.items()}, "argmax_stats_shape": shape,
        "target": "< 1.5x plain generate, fits one 80 GB GPU",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
