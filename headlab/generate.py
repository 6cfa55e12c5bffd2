"""Batched next-token distributions, final hidden states and greedy generation under a plan.

Core plumbing (the analyses and the playground use it) for comparing a model with and without an intervention on
whole prompts (safety heads, knowledge-conflict heads): prompts are tokenized once, batched, and
run inside `model.patched(plan)`, so every intervention goes through the patched attention (and
generation through its KV cache).

Batches for one forward pass are right-padded (the last real token of each row is read);
batches for generation are left-padded, as decoder-only generation needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan


def _pad_id(model: HeadModel) -> int:
    tok = model.text_tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode(model: HeadModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's special tokens), rejecting empty prompts."""
    if model.tokenizer is None:
        raise HeadlabError(f"{model.name} has no tokenizer; these analyses need text prompts")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise HeadlabError(f"prompt {i} is empty; every prompt must be a non-empty string")
        out.append(list(model.text_tokenizer(p)["input_ids"]))
    return out


def _padded(model: HeadModel, rows: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) of the rows padded to one width, on the model's device."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[j, cols] = torch.tensor(r)
        mask[j, cols] = 1
    return ids.to(model.device), mask.to(model.device)


def right_padded(model: HeadModel, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T], last [B] index of each row's last token), on the model's device."""
    ids, mask = _padded(model, rows, left=False)
    last = torch.tensor([len(r) - 1 for r in rows])
    return ids, mask, last.to(model.device)


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` of range(n)."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def last_token_outputs(model: HeadModel, prompts: Sequence[str] | Sequence[Sequence[int]], plan: InterventionPlan | None = None,
                       batch_size: int = 32, hidden: bool = False) -> torch.Tensor:
    """Per prompt, the next-token logits [N, V] (fp32, CPU) at its last token under `plan`, or with
    `hidden=True` the final hidden state there [N, d] (`hidden_states[-1]`, after the final norm).
    """
    rows = encode(model, prompts) if prompts and isinstance(prompts[0], str) else [list(r) for r in prompts]
    out = []
    for sl in batch_slices(len(rows), batch_size):
        ids, mask, last = right_padded(model, rows[sl])
        with model.patched(plan):
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        x = res.hidden_states[-1] if hidden else res.logits
        out.append(x[torch.arange(len(last), device=x.device), last].float().cpu())
    return torch.cat(out)


def greedy_tokens(model: HeadModel, input_ids: torch.Tensor, max_new_tokens: int, *,
                  attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None) -> torch.Tensor:
    """The tokens [B, T + n] of `model.generate(input_ids, do_sample=False, ...)` (left-padded rows),
    inside whatever `patched(...)` session is active. On a GPU through `headlab.decode.greedy_decode`
    (the decode step replayed from a CUDA graph where the session allows it: batch-1 decoding is
    otherwise host-bound); on the CPU, or for a model whose generation settings greedy_decode does
    not implement, through `generate()` itself."""
    from headlab.decode import generation_blocker, greedy_decode

    if model.device.type == "cuda" and generation_blocker(model) is None:
        return greedy_decode(model, input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id)
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=pad_token_id, **kwargs)


def greedy_generate(model: HeadModel, prompts: Sequence[str], plan: InterventionPlan | None = None,
                    max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt (special tokens dropped, whitespace stripped) under `plan`."""
    rows = encode(model, prompts)
    texts: list[str] = []
    for sl in batch_slices(len(rows), batch_size):
        ids, mask = _padded(model, rows[sl], left=True)  # decoder-only generation continues on the right
        with model.patched(plan):
            out = greedy_tokens(model, ids, max_new_tokens, attention_mask=mask, pad_token_id=_pad_id(model))
        for row in out[:, ids.shape[1]:]:
            texts.append(model.text_tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
