"""GPU check of the core (not a test): the exact reference patched attention on CUDA.

Prints and writes JSON with: parity of the "headlab" attention against SDPA/eager on a tiny
model on CUDA (fp32 and bf16), and the peak extra GPU memory of one layer's patched attention
with stats at long N against the size of one layer's materialized attention matrix.

    python benchmarks/core_gpu_check.py --out benchmarks/results/core_gpu_check.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

import headlab
from headlab.kernels.reference import patched_attention
from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest
from record import emit, header


def parity(device: str) -> dict:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                                      initializer_range=0.1, architectures=["LlamaForCausalLM"])
    out = {}
    with tempfile.TemporaryDirectory() as d:
        transformers.LlamaForCausalLM(config).save_pretrained(d)
        ids = torch.randint(0, 128, (2, 512), device=device)
        fp32 = None
        for dtype in (torch.float32, torch.bfloat16):
            model = headlab.load_model(d, dtype=dtype, device=device)
            eager = transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager").to(device).eval()
            with torch.no_grad():
                ref = eager(ids).logits.float()
            with model.patched(None, StatsRequest(entropy=True, argmax=True)):
                got = model(ids).logits.float()
            fp32 = ref if fp32 is None else fp32
            # In bf16 both sides round differently; the distance of each from the fp32 model says
            # whether the patched attention loses accuracy (it accumulates in fp32).
            out[str(dtype)] = {"max_abs_logit_diff_vs_eager": float((got - ref).abs().max()),
                               "headlab_vs_fp32_eager": float((got - fp32).abs().max()),
                               "eager_vs_fp32_eager": float((ref - fp32).abs().max()),
                               "logit_scale": float(ref.abs().max())}
            if dtype == torch.float32:
                kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
                with torch.no_grad():
                    expected = eager.generate(ids[:, :64], **kw)
                with model.patched(None, StatsRequest(argmax=True, queries=slice(-1, None))) as rec:
                    generated = model.generate(ids[:, :64], **kw)
                out[str(dtype)]["cached_generation_tokens_equal"] = bool(torch.equal(generated, expected))
                out[str(dtype)]["decode_stats_shape"] = list(rec.stats.argmax.shape)
    return out


def memory(device: str, n: int, heads: int = 32, kv_heads: int = 8, d: int = 128) -> dict:
    q = torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, n, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, n, d, device=device, dtype=torch.bfloat16)
    plan = InterventionPlan().scale_first_token({(0, h): 1.5 for h in range(heads)}).compile_layer(0, heads, d)
    request = StatsRequest(argmax=True, entropy=True, spans={"a": (0, 4), "b": (n // 2, n // 2 + 64), "c": [1, 7, 99]},
                           queries=slice(-256, None)).compile(n, n, torch.device(device))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    patched_attention(q, k, v, scaling=d ** -0.5, plan=plan, stats=request)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    quadratic = heads * n * n * 2  # one bf16 attention matrix of one layer
    return {"n": n, "heads": heads, "kv_heads": kv_heads, "head_dim": d, "peak_extra_mib": peak / 2**20,
            "one_layer_attention_matrix_bf16_mib": quadratic / 2**20, "seconds": round(seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = "cuda"
    result = {
        **header(),
        "kernel": "reference (exact PyTorch, chunked)",
        "parity": parity(device),
        "memory": [memory(device, n) for n in (4096, 16384, 32768)],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
