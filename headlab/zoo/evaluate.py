"""Encoding and exact-match evaluation of zoo task examples (used by training, cards and tests).

An example is answered correctly when greedy decoding after the prompt produces exactly the
answer and then <eos>. That is checked in one teacher-forced forward pass: greedy decoding
reproduces the answer iff at every answer position the argmax equals the answer token.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from headlab.zoo.tasks import Example


def encode(tokenizer: Any, examples: Sequence[Example], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T] and labels [B, T] (-100 outside answers).

    labels[b, t] is the token at t when t is an answer token (or the closing <eos>), so the
    prediction for it is read at t − 1.
    """
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: every answer token is the argmax of the previous position's logits."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    return ((pred == target) | ~scored).all(dim=1)


def answers_correct(model: Any, examples: Sequence[Example], *, plan: Any = None, batch_size: int = 32) -> list[bool]:
    """Exact-match result per example for a HeadModel, optionally under an InterventionPlan."""
    out: list[bool] = []
    for i in range(0, len(examples), batch_size):
        batch = encode(model.tokenizer, examples[i : i + batch_size], model.device)
        labels = batch.pop("labels")
        with model.patched(plan):
            logits = model(**batch).logits
        out += correct(logits, labels).tolist()
    return out


def accuracy(model: Any, examples: Sequence[Example], *, plan: Any = None, batch_size: int = 32) -> float:
    """Fraction of examples answered exactly."""
    results = answers_correct(model, examples, plan=plan, batch_size=batch_size)
    return sum(results) / max(1, len(results))


def mean_head_outputs(model: Any, examples: Sequence[Example], batch_size: int = 50) -> torch.Tensor:
    """[L, H, D] mean head output over all real (unpadded) positions of the examples' prompts+answers.

    The reference values for mean ablation (`InterventionPlan.ablate_heads(..., "mean", means=...)`).
    """
    from headlab.stats import StatsRequest

    L, H, D = model.spec.n_layers, model.spec.n_heads, model.spec.head_dim
    total = torch.zeros(L, H, D, dtype=torch.float64)
    count = 0
    for i in range(0, len(examples), batch_size):
        batch = encode(model.tokenizer, examples[i : i + batch_size], model.device)
        batch.pop("labels")
        with model.patched(None, StatsRequest(head_outputs=True)) as rec:
            model(**batch)
        z = rec.stats.head_outputs.cpu()  # [L, B, H, Q, D]; stats stay on the model device
        keep = batch["attention_mask"].bool().cpu()  # [B, Q]
        total += (z * keep[None, :, None, :, None]).sum(dim=(1, 3)).double()
        count += int(keep.sum())
    return (total / count).float()
