"""Where one head attends on one input, measured through the patched attention's stats.

    view = head_view(model, "text ...", layer=2, head=5, query=-1)
    view.tokens          # the input's tokens
    view.row             # [K] attention of the chosen query over every key
    view.received_mean   # [K] mean attention each key receives from the queries that see it
    view.top(5)          # the most attended keys of the chosen query

Nothing N×N is built, even for long inputs: one forward records, for the one layer, per-query
argmax / entropy and per-key received attention (O(Q + K) per head), and a second forward records
the probabilities over the keys of the `window` queries ending at the chosen one (O(window · K)
per head): the chosen query's row for every head of the layer (`layer_rows`), and the head's
attention among the window's tokens (`window_matrix`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.stats import StatsRequest

MAX_TOKENS = 8192
WINDOW = 48
"""Queries (ending at the chosen one) whose attention over the window's keys `window_matrix` holds."""


@dataclass
class HeadView:
    """One head's attention on one input. K = Q = number of tokens (a causal prefill).

    row [K]: attention of query `query_position` over the keys (0 after it);
    received_mean [K]: ACT's r[j], mean attention key j receives from the queries that see it;
    argmax [Q] / argmax_prob [Q] / entropy [Q]: per query, its top key, that key's probability, and
    the attention entropy (nats); span_mass: name -> [Q] attention mass on each named span.
    """

    layer: int
    head: int
    tokens: list[str]
    query_position: int
    row: torch.Tensor
    received_mean: torch.Tensor
    argmax: torch.Tensor
    argmax_prob: torch.Tensor
    entropy: torch.Tensor
    span_mass: dict[str, torch.Tensor] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    """The [start, end) token spans measured (with an image: "image", its tokens)."""
    layer_rows: torch.Tensor | None = None
    """[H, K] the chosen query's attention over the keys, for every head of the layer."""
    window_start: int = 0
    window_matrix: torch.Tensor | None = None
    """[W, W] this head's attention from the W queries window_start..query_position to the same
    W keys (the query × key matrix of the tokens shown, and nothing beyond them)."""

    def top(self, k: int = 10) -> list[tuple[int, str, float]]:
        """The k keys the chosen query attends to most, as (position, token, probability)."""
        probs, pos = torch.topk(self.row, min(k, self.row.numel()))
        return [(int(p), self.tokens[int(p)], float(v)) for v, p in zip(probs, pos)]

    def to_frame(self):
        """pandas DataFrame, one row per token: position, token, attention (from the chosen query),
        received_mean, and the token's own argmax / argmax_prob / entropy as a query."""
        import pandas as pd

        return pd.DataFrame({
            "position": range(len(self.tokens)), "token": self.tokens, "attention": self.row.tolist(),
            "received_mean": self.received_mean.tolist(), "argmax": self.argmax.tolist(),
            "argmax_prob": self.argmax_prob.tolist(), "entropy": self.entropy.tolist(),
        })


def _token_strings(model: HeadModel, ids: list[int]) -> list[str]:
    tok = model.text_tokenizer
    if hasattr(tok, "convert_ids_to_tokens"):
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return [tok.decode([i]) for i in ids]


def head_view(model: HeadModel, text: str | Sequence[int], layer: int, head: int, query: int = -1,
              spans: Mapping[str, tuple[int, int]] | None = None, plan: InterventionPlan | None = None,
              max_tokens: int = MAX_TOKENS, image: Any = None) -> HeadView:
    """Attention of head (`layer`, `head`) on `text` (a string, or token ids), under `plan` if given.

    `query` picks the query row shown in `row` (Python indexing: -1 is the last token); `spans`
    (name -> [start, end) token positions) adds their attention mass per query. With `image` (for a
    vision-language model; the text holds the processor's image placeholder) the image tokens
    become the span "image".
    """
    model.spec.check_head(layer, head)
    extra: dict[str, Any] = {}
    if image is not None:
        from headlab.vision import encode, image_positions

        if not isinstance(text, str):
            raise HeadlabError("with an image, give the prompt as text (the processor places the image tokens)")
        enc = encode(model, text, image)
        ids = enc["input_ids"][0].tolist()
        extra["pixel_values"] = enc["pixel_values"].to(model.dtype)
        pos = image_positions(model.spec, enc["input_ids"][0])
        spans = {**(spans or {}), "image": (int(pos[0]), int(pos[-1]) + 1)}
    elif isinstance(text, str):
        if not text.strip():
            raise HeadlabError("the input text is empty: type a prompt or pick an example")
        if model.tokenizer is None:
            raise HeadlabError(f"{model.name} has no tokenizer: pass token ids instead of text")
        tok = model.text_tokenizer
        ids = list(tok(text)["input_ids"])
    else:
        ids = [int(i) for i in text]
    n = len(ids)
    if n == 0:
        raise HeadlabError("the input has no tokens")
    if n > max_tokens:
        raise HeadlabError(f"the input has {n} tokens, more than max_tokens={max_tokens}; shorten it or raise max_tokens")
    if not -n <= query < n:
        raise HeadlabError(f"query position {query} is outside the input's {n} tokens (0..{n - 1}, or -1 for the last)")
    q = query % n
    clean_spans: dict[str, tuple[int, int]] = {}
    for name, span in (spans or {}).items():
        a, b = int(span[0]), int(span[1])
        if 0 <= a < b <= n:  # a span of another tokenization (or an edited text) is dropped, not an error
            clean_spans[name] = (a, b)
    x = torch.tensor([ids], device=model.device)
    per_query = StatsRequest(argmax=True, entropy=True, received=True, spans=clean_spans, layers=[layer])
    with model.patched(plan, per_query) as rec:
        model(x, **extra)
    s = rec.stats
    w0 = max(0, q - WINDOW + 1)
    with model.patched(plan, StatsRequest(keys=list(range(n)), queries=list(range(w0, q + 1)), layers=[layer])) as rec_row:
        model(x, **extra)
    probs = rec_row.stats.key_probs[0, 0].float().cpu()  # [H, W, K]
    row = probs[head, -1]
    return HeadView(
        layer=layer, head=head, tokens=_token_strings(model, ids), query_position=q, row=row,
        layer_rows=probs[:, -1], window_start=w0, window_matrix=probs[head, :, w0:q + 1],
        received_mean=s.received_mean[0, 0, head].float().cpu(),
        argmax=s.argmax[0, 0, head].cpu(), argmax_prob=s.argmax_prob[0, 0, head].float().cpu(),
        entropy=s.entropy[0, 0, head].float().cpu(),
        span_mass={name: s.span_mass(name)[0, 0, head].float().cpu() for name in clean_spans}, spans=clean_spans,
    )


__all__ = ["HeadView", "head_view"]
