"""Inputs and greedy answers of the toy VLM task (`headlab.zoo.shapes`)."""

from __future__ import annotations

import random
from typing import Any

import torch

from headlab.zoo import shapes


def inputs(processor: Any, ex: shapes.Example, rng: random.Random, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """The processor's tensors for one example (its image drawn with `rng`)."""
    if ex.needs_image:
        enc = processor(text=ex.prompt, images=ex.scene.array(rng), return_tensors="pt")
    else:
        enc = processor.tokenizer(ex.prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def answer(model: torch.nn.Module, processor: Any, ex: shapes.Example, rng: random.Random, device: Any = "cpu",
           max_words: int = 3) -> str:
    """The model's greedy answer (to <eos>, at most `max_words` words)."""
    enc = inputs(processor, ex, rng, device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
    tok = processor.tokenizer
    out = model.generate(**enc, max_new_tokens=max_words, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def blank(ex: shapes.Example) -> shapes.Example:
    """The same question with an empty image (the background only): what the model says without seeing the shape."""
    from dataclasses import replace

    if ex.scene is None:
        return ex
    return replace(ex, scene=replace(ex.scene, shape="none"))


def evaluate(model: Any, examples: list[shapes.Example], plan: Any = None, seed: int = 0) -> dict[str, float]:
    """Accuracy of a HeadModel under `plan` on `examples`, and for object questions the rate of
    answers that give the object's usual colour instead of the image's (`prior_rate`)."""
    rng = random.Random(seed)
    hits = prior = 0
    with model.patched(plan):
        for ex in examples:
            got = answer(model.model, model.tokenizer, ex, rng, model.device)
            hits += got == ex.answer
            if ex.kind == "object":
                obj = ex.prompt.split(" the ")[-1].split(" ")[0]
                prior += got == shapes.OBJECTS[obj]
    return {"accuracy": hits / len(examples), "prior_rate": prior / len(examples), "n": len(examples)}


@torch.no_grad()
def answer_logprob(model: Any, examples: list[shapes.Example], plan: Any = None, seed: int = 0) -> torch.Tensor:
    """[n] log-probability of each example's first answer word at the end of its prompt, under `plan`
    (a continuous measure: it moves when a pruned head matters even if the greedy answer does not flip)."""
    rng = random.Random(seed)
    tok = model.text_tokenizer
    out = []
    with model.patched(plan):
        for ex in examples:
            enc = inputs(model.tokenizer, ex, rng, model.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            logits = model(**enc).logits[0, -1].float()
            out.append(logits.log_softmax(-1)[tok.convert_tokens_to_ids(ex.answer.split()[0])])
    return torch.stack(out).cpu()
