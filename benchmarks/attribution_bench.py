"""Ships over every head of a Llama-3-8B-shaped model (random weights, bf16): exhaustive search vs
attribution + exact verification of the top heads (issue 19), in one run.

- exhaustive: `safety.ships(method="exact")`, every head ablated in turn, batches of several
  heads × the prompts (the fastest exhaustive path headlab has; the batch size that runs it
  fastest here is used). Its cost is the same forward pass once per head, so it is timed on an
  evenly spread sample of heads and scaled to all 1024 (per-head times are recorded).
- attribution: `safety.ships(method="atp", verify=K)` end to end: the clean pass, one forward +
  (top_tokens + 1) backward passes per batch, and K heads re-evaluated exactly.
- parity on the GPU: batched per-row plans vs one plan per pass; the estimate's rank correlation
  with the exact values on the sampled heads.

The zoo's code tokenizer (8192 tokens, inside Llama-3's vocabulary) turns held-out Python files
into prompts; the weights are random, so what the heads do means nothing — only the costs do.

    python benchmarks/attribution_bench.py --out benchmarks/results/attribution_bench_h100.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from headlab import attribution
from headlab.analyses import safety
from headlab.zoo import corpus
from record import emit, header
from retrieval_bench import llama3_8b_shaped, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt (about)")
    ap.add_argument("--verify", type=int, default=32)
    ap.add_argument("--top-tokens", type=int, default=8)
    ap.add_argument("--sample-heads", type=int, default=64, help="heads timed exhaustively (then scaled to all)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="exact-pass row counts tried")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = llama3_8b_shaped(args.layers)
    model.tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(corpus.__file__).parent / "pycode-llama"))
    tok = model.text_tokenizer
    prompts = []
    for text in corpus.texts(tok, n=args.prompts, max_tokens=4 * args.tokens, seed=0):
        ids = tok(text)["input_ids"][: args.tokens]
        prompts.append(tok.decode(ids[1:] if ids and ids[0] == tok.bos_token_id else ids))
    L, H = model.spec.shape
    every = [(l, h) for l in range(L) for h in range(H)]
    sample = every[:: max(1, len(every) // args.sample_heads)][: args.sample_heads]
    cfg = {b: safety.SafetyConfig(batch_size=b) for b in args.batches}

    # warm up every path (kernels, autotuning, allocator) on a small slice
    for b in args.batches:
        safety.ships(model, prompts[:8], cfg[b], heads=sample[:2], progress=False)
    safety.ships(model, prompts[:8], cfg[args.batches[0]], progress=False, method="atp", verify=2, top_tokens=args.top_tokens)

    # parity: several heads × prompts in one batch == one plan per pass
    rows = safety.ships(model, prompts[:16], cfg[max(args.batches)], heads=sample[:4], progress=False).per_query
    single = safety.ships(model, prompts[:16], safety.SafetyConfig(batch_size=16), heads=sample[:4], progress=False).per_query
    parity = float((rows - single).abs().max() / single.abs().max().clamp_min(1e-30))

    exhaustive = {}
    exact_sample = None
    for b in args.batches:
        seconds, peak, res = timed(lambda b=b: safety.ships(model, prompts, cfg[b], heads=sample, progress=False))
        exhaustive[b] = {"sample_seconds": round(seconds, 3), "seconds_per_head": round(seconds / len(sample), 4),
                         "all_heads_seconds_scaled": round(seconds / len(sample) * len(every), 1), "peak_gib": round(peak, 2)}
        exact_sample = res
    best_b = min(exhaustive, key=lambda b: exhaustive[b]["seconds_per_head"])
    atp_b = best_b
    seconds, peak, atp = timed(lambda: safety.ships(model, prompts, cfg[atp_b], progress=False, method="atp",
                                                    verify=args.verify, top_tokens=args.top_tokens))
    est = atp.estimate.values
    exact_vals = exact_sample.scores.values
    rho = attribution.Verification(heads=sample, estimate=[float(est[h]) for h in sample],
                                   exact=[float(exact_vals[h]) for h in sample]).summary()
    full = exhaustive[best_b]["all_heads_seconds_scaled"]
    result = {
        **header(),
        "model": f"Llama-3-8B shape, {args.layers} layers, 32 q / 8 kv heads, d=128, bf16, random weights",
        "prompts": args.prompts, "tokens_per_prompt": args.tokens, "heads": len(every),
        "ships": {"ablation": "attention", "epsilon": 1e-4},
        "exhaustive": {"by_batch_rows": exhaustive, "best_batch_rows": best_b, "sampled_heads": len(sample),
                       "all_heads_seconds_scaled": full},
        "attribution": {"batch_rows": atp_b, "verify": args.verify, "top_tokens": args.top_tokens,
                        "end_to_end_seconds": round(seconds, 2), "peak_gib": round(peak, 2),
                        "top_token_mass": atp.scores.params.get("top_token_mass"),
                        "verification": atp.verification},
        "speedup_exhaustive_over_attribution": round(full / seconds, 1),
        "estimate_vs_exact_on_sampled_heads": rho,
        "row_plan_parity_max_rel_diff": parity,
        "target": ">= 20x faster end to end than exhaustive Ships over all heads, 64 prompts",
        "command": "python benchmarks/attribution_bench.py --out benchmarks/results/attribution_bench_h100.json",
        "seed": 0,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
