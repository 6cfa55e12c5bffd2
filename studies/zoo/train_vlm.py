"""Train the zoo's toy VLM `zoo:shapes-llava` on the synthetic image task of `headlab.zoo.shapes`.

    python studies/zoo/train_vlm.py --out headlab/zoo/shapes-llava --steps 3000
    python studies/zoo/train_vlm.py --out /tmp/smoke --steps 5          # a smoke run

The model is a real `LlavaForConditionalGeneration`: a 2-layer CLIP vision tower (32×32 images in
8×8 patches: 16 image tokens), the 2-layer MLP projector, and a 4-layer Llama language model
(8 query / 2 kv heads, d=128). It ships with its `LlavaProcessor` (CLIP image processor + the
word-level tokenizer of `shapes.vocabulary()`), so `headlab.load_model("zoo:shapes-llava")` gets
both. Each step trains on one batch of one question kind (kinds in turn), loss on the answer
tokens only. Writes the model (fp16 safetensors), the processor, and `training.json` (arguments,
loss curve, held-out accuracy per kind, wall time).
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from headlab.io import atomic_write_json
from headlab.zoo import shapes
from headlab.zoo.tokenizer import build_word_tokenizer


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--prior", type=float, default=0.9, help="P(an object's image shows its usual colour)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=48, help="held-out questions per kind at each evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    return ap.parse_args()


def build_processor(directory: Path | None = None) -> transformers.LlavaProcessor:
    tokenizer = build_word_tokenizer(shapes.vocabulary())
    # the processor writes "<image>" n times without spaces: as a special token it splits out of the run
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": shapes.SIZE},
                                                      crop_size={"height": shapes.SIZE, "width": shapes.SIZE})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", image_token="<image>",
                                            num_additional_image_tokens=1)
    if directory is not None:
        processor.save_pretrained(directory)
    return processor


def build_model(processor: transformers.LlavaProcessor) -> transformers.LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=shapes.SIZE, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                                      architectures=["LlavaForConditionalGeneration"], pad_token_id=tok.pad_token_id)
    return transformers.LlavaForConditionalGeneration(config)


def images(examples: list[shapes.Example], rng: random.Random) -> list:
    return [ex.scene.array(rng) for ex in examples]


def batch(processor, examples: list[shapes.Example], rng: random.Random, device: str) -> dict[str, torch.Tensor]:
    """Prompt + answer + <eos>, right-padded; labels only on the answer and <eos>."""
    tok = processor.tokenizer
    texts = [f"{ex.prompt} {ex.answer}" for ex in examples]
    if examples[0].needs_image:
        enc = processor(text=texts, images=images(examples, rng), return_tensors="pt", padding=True)
    else:
        enc = tok(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    eos = torch.full((ids.shape[0], 1), tok.pad_token_id)
    ids = torch.cat([ids, eos], 1)
    mask = torch.cat([enc["attention_mask"], torch.zeros_like(eos)], 1)
    labels = torch.full_like(ids, -100)
    for i, ex in enumerate(examples):
        n = int(mask[i].sum())
        n_answer = len(ex.answer.split())
        ids[i, n] = tok.eos_token_id
        mask[i, n] = 1
        labels[i, n - n_answer: n + 1] = ids[i, n - n_answer: n + 1]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "pixel_values" in enc:
        out["pixel_values"] = enc["pixel_values"]
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def accuracy(model, processor, examples: list[shapes.Example], device: str, seed: int = 0) -> float:
    """Greedy answers (up to 3 words, to <eos>) equal to the reference, one example at a time."""
    from headlab.zoo.shapes_eval import answer

    rng = random.Random(seed)
    hits = sum(answer(model, processor, ex, rng, device) == ex.answer for ex in examples)
    return hits / len(examples)


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    processor = build_processor()
    model = build_model(processor).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) *
                                              0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    log, evals, t0 = [], [], time.time()
    for step in range(args.steps):
        kind = shapes.KINDS[step % len(shapes.KINDS)]
        examples = [shapes.example(rng, kind, prior=args.prior) for _ in range(args.batch)]
        model.train()
        loss = model(**batch(processor, examples, rng, args.device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(round(float(loss.detach()), 4))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = {k: accuracy(model, processor, shapes.held_out(k, args.eval_n), args.device) for k in shapes.KINDS}
            acc["object_conflict"] = accuracy(model, processor, shapes.held_out("object", args.eval_n, seed=71_000, conflict=True),
                                              args.device)
            evals.append({"step": step + 1, **acc})
            print(f"step {step + 1} loss {sum(log[-50:]) / len(log[-50:]):.4f} {acc}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    build_processor(args.out)
    atomic_write_json({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "loss": log[::10], "eval": evals, "wall_s": round(time.time() - t0, 1), "device": args.device,
                       "machine": platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.out / "training.json")


if __name__ == "__main__":
    main()
