"""Attention sinks: first-token mass, hidden sinks and massive activations, per head.

Definitions (METHODS.md, "Attention sinks and ACT"; Yu et al. 2024, reference code GATECH-EIC/ACT):
- first-token mass of head h: mean over the text's queries of A[h, i, 0];
- received attention of key j: r[j] = Σ_i A[h,i,j] / #(queries that see j) — computed inside the
  patched attention (`StatsRequest(received=True)`), never by materializing attention;
- hidden sinks of head h: tokens beyond the first (j ≥ 1) with r[j] > τ (τ = 0.1, the paper's
  threshold). ACT itself drops the *first element* of the set {r > τ}, which is position 0 when
  the initial token is a sink; this analysis reports every position ≥ 1 above τ so that a model
  whose first token is not a sink still shows its sinks;
- massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"):
  residual-stream entries whose magnitude exceeds `massive_abs` and `massive_ratio` × the median
  magnitude of that layer's hidden states for the text (paper: > 100 and ~1000× the median).

Texts are run one at a time (no padding), through the patched attention. τ = 0.1 is meant for
long inputs: on a text of fewer than ~10 tokens, uniform attention alone gives r[j] > 0.1.

    from headlab.analyses import sinks
    report = sinks.score(model, ["some text", ...])
    report.first_token_mass.top(5); report.hidden_sinks.head(); report.massive.head()
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass, field
from collections.abc import MutableMapping
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from headlab.checkpoint import cached
from headlab.errors import HeadlabError
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.scores import HeadScores
from headlab.stats import StatsRequest


@dataclass(frozen=True)
class SinksConfig:
    """Parameters, with the papers' defaults."""

    tau: float = 0.1
    """ACT's sink threshold on received attention r[j]."""
    massive_abs: float = 100.0
    """Massive activation: |h| above this ..."""
    massive_ratio: float = 1000.0
    """... and above this multiple of the layer's median |h| for the text."""
    max_tokens: int = 4096


@dataclass
class SinkReport:
    """Results of `score`. Frames have one row per finding."""

    first_token_mass: HeadScores
    hidden_sink_rate: HeadScores
    """Per head: fraction of texts in which the head has at least one hidden sink."""
    hidden_sinks: Any
    """DataFrame: text, layer, head, position, token, received."""
    massive: Any
    """DataFrame: text, layer (0 = embeddings), position, token, dim, value, ratio_to_median."""
    top_activation: Any
    """DataFrame: per text and layer, the largest |h| with its position, token, dim and ratio."""
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    """first_token_mass and hidden_sink (0/1) per text: [n_texts, L, H] each."""

    @property
    def fraction_of_heads_with_hidden_sinks(self) -> float:
        return float((self.hidden_sink_rate.values > 0).float().mean())


def build_dataset(texts: Sequence[str] | None = None, path: str | None = None) -> list[str]:
    """Texts to analyse: given directly, or one per line of a UTF-8 text file (blank lines skipped)."""
    if path is not None:
        from headlab.io import iter_lines

        texts = [line for _, line in iter_lines(path, "a UTF-8 text file, one text per line") if line.strip()]
    if not texts:
        raise HeadlabError("the sinks analysis needs at least one non-empty text")
    return list(texts)


def _text_findings(model: HeadModel, t: int, text: str, request: StatsRequest, config: SinksConfig) -> dict:
    """Everything one text contributes: per-head first-token mass and sink flag [L][H], finding rows."""
    enc = model.tokenize(text, truncation=True, max_length=config.max_tokens)
    ids = enc["input_ids"][0].tolist()
    tokens = model.text_tokenizer.convert_ids_to_tokens(ids)
    with model.patched(None, request) as rec:
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
    first = rec.stats.span_mass("first")[:, 0].mean(dim=-1).double().cpu()
    r = rec.stats.received_mean[:, 0].cpu()  # [L, H, K]
    hidden = r[..., 1:] > config.tau
    sinks = [{"text": t, "layer": layer, "head": head, "position": j + 1, "token": tokens[j + 1],
              "received": float(r[layer, head, j + 1])} for layer, head, j in hidden.nonzero().tolist()]
    states = torch.stack(out.hidden_states)[:, 0].float().abs().cpu()  # [L+1, T, D]
    median = states.flatten(1).median(dim=1).values.clamp_min(1e-12)  # [L+1]
    ratio = states / median[:, None, None]
    top = []
    for layer in range(states.shape[0]):
        pos, dim = divmod(int(states[layer].argmax()), states.shape[-1])
        top.append({"text": t, "layer": layer, "position": pos, "token": tokens[pos], "dim": dim,
                    "value": float(states[layer, pos, dim]), "ratio_to_median": float(ratio[layer, pos, dim])})
    massive = (states > config.massive_abs) & (ratio > config.massive_ratio)
    massive_rows = [{"text": t, "layer": layer, "position": pos, "token": tokens[pos], "dim": dim,
                     "value": float(states[layer, pos, dim]), "ratio_to_median": float(ratio[layer, pos, dim])}
                    for layer, pos, dim in massive.nonzero().tolist()]
    return {"first": first.tolist(), "has_sink": hidden.any(dim=-1).double().tolist(), "sinks": sinks,
            "massive": massive_rows, "top": top}


def score(model: HeadModel, texts: Sequence[str], config: SinksConfig = SinksConfig(), progress: bool = True,
          cache: MutableMapping[str, Any] | None = None) -> SinkReport:
    """Run every text through the patched attention and collect sink statistics per head.

    `cache` (e.g. a run's `Checkpoint`) keeps each finished text's findings: a resumed run skips them.
    """
    import pandas as pd

    texts = build_dataset(texts)
    L, H = model.spec.shape
    first_sum = torch.zeros(L, H, dtype=torch.float64)
    sink_count = torch.zeros(L, H, dtype=torch.float64)
    sink_rows, massive_rows, top_rows, firsts, has_sinks = [], [], [], [], []
    request = StatsRequest(received=True, spans={"first": [0]})
    for t, text in enumerate(tqdm(texts, desc="sinks", disable=not progress)):
        done = cached(cache, str(t), lambda t=t, text=text: _text_findings(model, t, text, request, config))
        firsts.append(torch.tensor(done["first"], dtype=torch.float64))
        has_sinks.append(torch.tensor(done["has_sink"], dtype=torch.float64))
        first_sum += firsts[-1]
        sink_count += has_sinks[-1]
        sink_rows += done["sinks"]
        massive_rows += done["massive"]
        top_rows += done["top"]
    n = float(len(texts))
    common = dict(model=model.name, params={"tau": config.tau, "texts": len(texts)})
    return SinkReport(
        first_token_mass=HeadScores(sums=first_sum, counts=torch.full((L, H), n, dtype=torch.float64),
                                    analysis="first_token_mass", **common),
        hidden_sink_rate=HeadScores(sums=sink_count, counts=torch.full((L, H), n, dtype=torch.float64),
                                    analysis="hidden_sink_rate", **common),
        hidden_sinks=pd.DataFrame(sink_rows, columns=["text", "layer", "head", "position", "token", "received"]),
        massive=pd.DataFrame(massive_rows, columns=["text", "layer", "position", "token", "dim", "value", "ratio_to_median"]),
        top_activation=pd.DataFrame(top_rows, columns=["text", "layer", "position", "token", "dim", "value", "ratio_to_median"]),
        per_sample={"first_token_mass": torch.stack(firsts), "hidden_sink_rate": torch.stack(has_sinks)},
    )


ENGLISH_TEXTS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate it approved the plan.",
    "Rivers carry sediment from the mountains to the sea, building deltas where the current slows and the sand settles.",
    "She opened the old book carefully, because its pages were brittle and the ink had faded to a pale brown.",
    "In the afternoon the market fills with people buying bread, fruit and fish, and the noise carries across the square.",
]
"""Default texts of the sinks job for models with an English tokenizer (zoo:minilm-l6)."""


@analysis("sinks", "score", summary="Attention sinks: first-token mass, hidden sinks (r > tau), massive activations.",
          paper="Sun et al. 2024 (massive activations); Yu et al. 2024 (ACT's hidden sinks) — METHODS.md: attention sinks",
          datasets="a text file, one text per line (--data); zoo models bring their own",
          writes=("first_token_mass", "hidden_sink_rate", "hidden_sinks", "massive", "top_activation", "summary"),
          files=("data",), help={"data": "text file, one text per line", "n": "zoo prompts when no --data",
                                 "tau": "hidden-sink threshold on the attention ratio r"})
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        n: int = 20, tau: float = 0.1, progress: bool = True) -> Path:
    from headlab import jobs

    params = {"data": data, "n": n, "tau": tau}
    if data:
        texts = build_dataset(path=data)
    elif jobs.is_zoo_task_model(model):
        from headlab.zoo import tasks

        texts = [ex.prompt for task in ("needle", "mcqa") for ex in tasks.held_out(task, max(1, n // 2), seed=30_000)]
    elif jobs.is_corpus_model(model):
        from headlab.zoo import corpus

        texts = corpus.texts(None, n, max_tokens=512)
    elif model == "zoo:minilm-l6":
        texts = ENGLISH_TEXTS
    else:
        raise HeadlabError(f"give --data (a text file, one text per line) for {model}")
    with jobs.started(out, "sinks", model, params, run_id) as (run, hm):
        report = score(hm, texts, SinksConfig(tau=tau), progress=progress, cache=jobs.checkpoint(run))
        summary = {"texts": len(texts), "fraction_of_heads_with_hidden_sinks": report.fraction_of_heads_with_hidden_sinks,
                   "top_first_token_heads": [[l, h, s] for l, h, s in report.first_token_mass.top(10)],
                   "massive_activations": len(report.massive)}
        run.save_samples(report.hidden_sinks, "hidden_sinks")
        run.save_samples(report.massive, "massive")
        run.save_samples(report.top_activation, "top_activation")
        run.save_per_sample(report.per_sample, [f"text {t}" for t in range(len(texts))])
        run.save_examples([{"text": t, "label": f"text {i}", "spans": {"first": (0, 1)}} for i, t in enumerate(texts)])
        return jobs.finish(run, summary, {"first_token_mass": report.first_token_mass,
                                          "hidden_sink_rate": report.hidden_sink_rate})
