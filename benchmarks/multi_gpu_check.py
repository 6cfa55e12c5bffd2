"""A model split over two GPUs with `device_map` (issue 21, GPU part b): patched logits equal the
single-GPU logits, a plan on heads that live on the second GPU takes effect (and equals the
single-GPU plan), and stats gather on the first GPU equal to the single-GPU stats.

A 16-layer Llama (hidden 2048, 16 q / 4 kv heads, head_dim 128, bf16, random weights, seed 0) is
saved once, then loaded twice: whole on cuda:0, and with layers 0–7 on cuda:0 and 8–15 on cuda:1.

    python benchmarks/multi_gpu_check.py --out benchmarks/results/multi_gpu_check_h200x2.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import headlab
from headlab import InterventionPlan, StatsRequest
from record import emit, header


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    torch.manual_seed(0)
    layers = 16
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=4, architectures=["LlamaForCausalLM"])
    path = Path(tempfile.mkdtemp()) / "llama16"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    split.update({f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)})
    whole = headlab.load_model(path, dtype=torch.bfloat16, device="cuda:0", load_tokenizer=False)
    spread = headlab.load_model(path, dtype=torch.bfloat16, device_map=split, load_tokenizer=False)
    devices = sorted({str(p.device) for p in spread.model.parameters()})
    ids = torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(1))
    plan = InterventionPlan().prune_heads([(12, 3), (15, 0)]).scale_first_token({(10, 5): 4.0})
    request = StatsRequest(entropy=True, spans={"first": (0, 1)})

    def run(model, p):
        with model.patched(p, request) as rec, torch.no_grad():
            logits = model(input_ids=ids.to(model.device)).logits.float().cpu()
        return logits, rec.stats.entropy.float().cpu(), str(rec.stats.entropy.device)

    plain_w, ent_w, _ = run(whole, None)
    plain_s, ent_s, stats_device = run(spread, None)
    plan_w, pent_w, _ = run(whole, plan)
    plan_s, pent_s, _ = run(spread, plan)
    result = {
        **header(),
        "model": f"Llama, {layers} layers, hidden 2048, 16 q / 4 kv heads, head_dim 128, bf16, random weights (seed 0)",
        "split": "layers 0-7 on cuda:0, 8-15 (and the final norm, lm_head) on cuda:1",
        "devices_of_split_model": devices, "multi_device": spread.multi_device, "stats_gathered_on": stats_device,
        "max_abs_logit_diff_plain": float((plain_w - plain_s).abs().max()),
        "max_abs_logit_diff_with_plan": float((plan_w - plan_s).abs().max()),
        "plan_changes_logits_by": float((plan_s - plain_s).abs().max()),
        "plan_heads": "prune L12H3, L15H0 (second GPU); first-token gamma 4 on L10H5 (second GPU)",
        "max_abs_entropy_diff": float((ent_w - ent_s).abs().max()),
        "max_abs_entropy_diff_with_plan": float((pent_w - pent_s).abs().max()),
        "entropy_shape": list(ent_s.shape),
        "command": "python benchmarks/multi_gpu_check.py --out benchmarks/results/multi_gpu_check_h200x2.json",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
