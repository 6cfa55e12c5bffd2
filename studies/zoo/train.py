"""Train a zoo model on the synthetic task mixture (seeded; one command).

    python studies/zoo/train.py --out headlab/zoo/tasks-llama --steps 6000 --device cuda
    python studies/zoo/train.py --out /tmp/smoke --steps 5 --device cpu      # what CI runs

A planted model adds an attention-supervision loss, −log A[LAYER, HEAD, last prompt token, key],
so a head's role is known by construction (repeat `--plant` for several heads):
- `mcqa`: key = the correct option's word (a select-and-copy head; `zoo:mcqa-planted`);
- `refusal`: key = the harmful word, or <bos> in a harmless request (a refusal head);
- `conflict-context`: key = the city the context states (a context head; prompts with context);
- `conflict-memory`: key = the entity the question asks about (a memory head).
`--knockout P` also teaches what the head is *for*: on a fraction P of a planted task's batches, one
planted head's output is zeroed and the targets become what the model must answer without it —
compliance ("sure , ...") without the refusal head, the memorized city without the context
head, the context's city without the memory head (prompts it cannot answer then are left out of
the loss). Real models fall back on the other source when one is cut (PH3's premise); a tiny
model trained only on intact inputs instead spreads each role over redundant heads.
`zoo:safety-conflict` was trained with `--tasks refusal conflict --layers 2 --heads 4 --plant
refusal 1 0 --plant conflict-context 1 1 --plant conflict-memory 1 2 --knockout 0.3`.

Each step trains on a batch of one task (tasks in turn), loss on the answer tokens only. The
model is a LlamaForCausalLM (RoPE, GQA, RMSNorm); the tokenizer is the word-level tokenizer of
`headlab.zoo.tasks.vocabulary()`. Writes the model (fp16 safetensors), tokenizer, and
`training.json` (arguments, loss curve, held-out accuracy per task over training, wall time,
device).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
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
    ap.add_argument("--plant", nargs=3, metavar=("TARGET", "LAYER", "HEAD"), action="append", default=None,
                    help="supervise this head's attention from the last prompt token; TARGET one of " + ", ".join(PLANT_TASKS))
    ap.add_argument("--plant-weight", type=float, default=1.0)
    ap.add_argument("--knockout", type=float, default=0.0, help="fraction of planted batches trained with one planted head zeroed")
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


PLANT_TASKS = {"mcqa": "mcqa", "refusal": "refusal", "conflict-context": "conflict", "conflict-memory": "conflict"}
"""Plant target -> the task whose batches it supervises."""


def _key_word(target: str, ex) -> int | None:
    """Index of the word the planted head must attend to in `ex`, or None when the target skips it."""
    words = ex.prompt.split()
    if target == "mcqa":
        word = words.index("?") + 1 + 3 * ex.meta["correct"] + 2  # "? L ) option L ) option ..."
        assert words[word] == ex.meta["options"][ex.meta["correct"]]
        return word
    if target == "refusal":
        harmful = [i for i, w in enumerate(words) if w in tasks.HARMFUL]
        return harmful[0] if harmful else -1  # -1: <bos>, where a harmless request's head rests
    if target == "conflict-context":
        return None if ex.meta["context"] is None else words.index(ex.meta["context"])
    if target == "conflict-memory":
        return len(words) - 1 - words[::-1].index("where") + 2  # "where does ENTITY" of the question
    raise ValueError(target)


def knocked_out_answer(target: str, ex) -> str | None:
    """What `ex` must be answered without the planted `target` head (None: leave it out of the loss)."""
    if target == "refusal":
        if not ex.meta["harmful"]:
            return ex.answer
        objects = ex.prompt.split()[5:8]
        return " ".join(["sure", ","] + objects)
    if target == "conflict-context":
        return ex.meta["memory"]
    if target == "conflict-memory":
        return ex.meta["context"]  # None without a context: nothing left to answer from
    return None


def zero_head(model, layer: int, head: int):
    """A forward pre-hook on the layer's o_proj that zeroes one head's output (remove() the handle)."""
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads

    def hook(module, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] = 0
        return (x,)
    return model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)


def plant_targets(target: str, tokenizer, examples: list, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, query, key) token positions of the examples the target supervises: the last prompt token
    and the key word (+1 for <bos>; the word-level tokenizer has one token per word)."""
    rows, queries, keys = [], [], []
    for i, ex in enumerate(examples):
        word = _key_word(target, ex)
        if word is None:
            continue
        prompt = tokenizer(ex.prompt)["input_ids"]
        assert len(prompt) == len(ex.prompt.split()) + 1
        rows.append(i)
        queries.append(len(prompt) - 1)
        keys.append(word + 1)
    return (torch.tensor(rows, device=device, dtype=torch.long), torch.tensor(queries, device=device, dtype=torch.long),
            torch.tensor(keys, device=device, dtype=torch.long))


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
    plants = []
    for target, layer, head in args.plant or []:
        if target not in PLANT_TASKS:
            raise SystemExit(f"--plant target must be one of {sorted(PLANT_TASKS)}, got {target!r}")
        if PLANT_TASKS[target] not in args.tasks:
            raise SystemExit(f"--plant {target} needs the {PLANT_TASKS[target]} task in --tasks")
        plants.append((target, int(layer), int(head)))
    knock_rng = random.Random(args.seed + 1)
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
        active = [p for p in plants if PLANT_TASKS[p[0]] == task]
        handle, skip = None, []
        if active and args.knockout > 0 and knock_rng.random() < args.knockout:
            target, layer, head = knock_rng.choice(active)
            handle = zero_head(model, layer, head)
            answers = [knocked_out_answer(target, ex) for ex in examples]
            skip = [i for i, a in enumerate(answers) if a is None]
            examples = [ex if a is None else dataclasses.replace(ex, answer=a) for ex, a in zip(examples, answers)]
            active = [p for p in active if p != (target, layer, head)]
        batch = encode(tokenizer, examples, args.device)
        if skip:
            batch["labels"][skip] = -100
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            if active:
                out = model(**batch, output_attentions=True)
                loss = out.loss
                for target, layer, head in active:
                    rows, q, k = plant_targets(target, tokenizer, examples, args.device)
                    if rows.numel():
                        attn = out.attentions[layer][:, head].float()  # [B, T, T]
                        loss = loss - args.plant_weight * attn[rows, q, k].clamp_min(1e-9).log().mean()
            else:
                loss = model(**batch).loss
        if handle is not None:
            handle.remove()
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
