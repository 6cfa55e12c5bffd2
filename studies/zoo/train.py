"""Train a zoo model on the synthetic task mixture (seeded; one command).

    python studies/zoo/train.py --out headlab/zoo/tasks-llama --steps 6000 --device cuda
    python studies/zoo/train.py --out /tmp/smoke --steps 5 --device cpu      # what CI runs

A planted model (`--plant mcqa 1 2 --tasks mcqa`, shipped as `zoo:mcqa-planted`) adds an
attention-supervision loss: head (LAYER, HEAD)'s attention from the last prompt token must land
on the correct option's word — a select-and-copy head whose identity is known by construction.

Each step trains on a batch of one task (tasks in turn), loss on the answer tokens only. The
model is a LlamaForCausalLM (RoPE, GQA, RMSNorm); the tokenizer is the word-level tokenizer of
`headlab.zoo.tasks.vocabulary()`. Writes the model (fp16 safetensors), tokenizer, and
`training.json` (arguments, loss curve, held-out accuracy per task over training, wall time,
device).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from headlab.io import atomic_write_json
from headlab.zoo import tasks
from headlab.zoo.evaluate import correct, encode
from headlab.zoo.tokenizer import build_word_tokenizer


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--haystack", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    ap.add_argument("--plant", nargs=3, metavar=("TASK", "LAYER", "HEAD"), default=None,
                    help="supervise this head's attention (only 'mcqa': last prompt token -> correct option)")
    ap.add_argument("--plant-weight", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def build_model(args: argparse.Namespace, tokenizer) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    return transformers.LlamaForCausalLM(config)


def mcqa_targets(tokenizer, examples: list, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) token positions per example: the last prompt token, the correct option's word."""
    queries, keys = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        words = ex.prompt.split()
        word = words.index("?") + 1 + 3 * ex.meta["correct"] + 2  # "? L ) option L ) option ..."
        assert words[word] == ex.meta["options"][ex.meta["correct"]] and len(prompt) == len(words) + 1
        queries.append(len(prompt) - 1)
        keys.append(word + 1)  # after <bos>; the word-level tokenizer has one token per word
    return torch.tensor(queries, device=device), torch.tensor(keys, device=device)


def evaluate(model, tokenizer, sets: dict[str, list], device: str) -> dict[str, float]:
    model.eval()
    result = {}
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for task, examples in sets.items():
            hits = []
            for i in range(0, len(examples), 50):
                batch = encode(tokenizer, examples[i : i + 50], device)
                labels = batch.pop("labels")
                hits += correct(model(**batch).logits.float(), labels).tolist()
            result[task] = sum(hits) / len(hits)
    model.train()
    return result


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(tasks.vocabulary(), args.out)
    model = build_model(args, tokenizer).to(args.device)
    # eager when planting: the supervised head's attention probabilities must be returned
    model.config._attn_implementation = "eager" if args.plant else "sdpa"
    plant = None
    if args.plant:
        if args.plant[0] != "mcqa":
            raise SystemExit("--plant supports the mcqa task only")
        plant = (int(args.plant[1]), int(args.plant[2]))
    streams = {t: tasks.generator(t, args.seed, **({"length": tuple(args.haystack)} if t == "needle" else {})) for t in args.tasks}
    held = {t: tasks.held_out(t, args.eval_n, **({"length": tuple(args.haystack)} if t == "needle" else {})) for t in args.tasks}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps)))))
    log = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "loss": [], "eval": []}
    t0 = time.perf_counter()
    for step in range(args.steps):
        task = args.tasks[step % len(args.tasks)]
        examples = [next(streams[task]) for _ in range(args.batch)]
        batch = encode(tokenizer, examples, args.device)
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            if plant is not None and task == "mcqa":
                out = model(**batch, output_attentions=True)
                q, k = mcqa_targets(tokenizer, examples, args.device)
                attn = out.attentions[plant[0]][:, plant[1]].float()  # [B, T, T]
                rows = torch.arange(len(examples), device=args.device)
                loss = out.loss - args.plant_weight * attn[rows, q, k].clamp_min(1e-9).log().mean()
            else:
                loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            log["loss"].append({"step": step, "task": task, "loss": loss.item()})
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc = evaluate(model, tokenizer, held, args.device)
            log["eval"].append({"step": step + 1, **acc})
            print(f"step {step + 1}: loss {loss.item():.4f} " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    log["final_accuracy"] = log["eval"][-1] if log["eval"] else {}
    log["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    log["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    log["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model.config._attn_implementation = "eager"
    model.to(torch.float16).save_pretrained(args.out)
    atomic_write_json(log, args.out / "training.json")


if __name__ == "__main__":
    main()
