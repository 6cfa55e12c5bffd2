"""Previous-token, duplicate-token and induction heads, scored as TransformerLens's `detect_head`
scores them — from patched-attention stats, never a layer's N×N attention matrix.

Definitions (transformer_lens/head_detector.py, read for the facts; METHODS.md "Head-pattern
detectors"). For the tokens t_0..t_{n−1} of one input (t_0 the BOS the tokenizer prepends), each
kind is a lower-triangular 0/1 detection pattern P:
- previous token: P[i, i−1] = 1;
- duplicate token: P[i, j] = 1 for j < i with t_j = t_i;
- induction: P[i, j] = 1 for 1 ≤ j ≤ i with t_{j−1} = t_i (TL shifts the duplicate pattern one key
  to the right, so the diagonal counts when t_{i−1} = t_i).
The score ("mul", TL's default) is Σ_ij A[i,j] P[i,j] / Σ_ij A[i,j] over all queries i of the
input, where `exclude_bos` zeroes key 0 and `exclude_current_token` zeroes the diagonal of A (in
both sums). Over several inputs, the mean of the per-input scores (`detect_head` on a list).

How it is measured here: the numerator is a `TokenMatch` stat per kind (labels: positions for the
previous token, token ids for duplicates, the previous key's token id for induction; key 0 gets a
never-matching label under `exclude_bos`, and `strict` drops the diagonal under
`exclude_current_token`), i.e. per (head, query) the mass on that query's matching keys; the
denominator per query is 1 − [exclude_bos]·A[i,0] − [exclude_current_token]·A[i,i] (+ A[0,0]
when both remove the same entry), from a span on key 0 and a diagonal `TokenMatch`. One forward
per input, O(queries) numbers per head — equal to `detect_head` through a TransformerBridge to
1e-4 (tests/test_patterns.py). TL's "abs" error measure needs the whole pattern and is not offered.

Inputs: texts (tokenized by the model's tokenizer, as TL's `to_tokens` does) or token-id
sequences — the classic induction probe is a random token block repeated twice
(`repeated_random_tokens`), on which an induction head attends to the token after the previous
occurrence of the current token (Olsson et al. 2022).
"""

from __future__ import annotations

from pathlib import Path
import random
from dataclasses import dataclass
from typing import Any, Literal, MutableMapping, Sequence

import torch
from tqdm.auto import tqdm

from headlab.checkpoint import cached
from headlab.errors import HeadlabError
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.scores import HeadScores
from headlab.stats import StatsRequest, TokenMatch

Kind = Literal["previous_token", "duplicate_token", "induction"]
KINDS: tuple[Kind, ...] = ("previous_token", "duplicate_token", "induction")
TL_NAMES = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}
"""The detection-pattern names TransformerLens's detect_head takes for each kind."""


@dataclass(frozen=True)
class PatternsConfig:
    """Which patterns, with detect_head's options (defaults as in TransformerLens)."""

    kinds: tuple[Kind, ...] = KINDS
    exclude_bos: bool = False
    exclude_current_token: bool = False
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise HeadlabError(f"unknown pattern kinds {unknown or '(none given)'}: choose from {', '.join(KINDS)}")


def token_match(ids: torch.Tensor, kind: Kind, exclude_bos: bool = False, exclude_current_token: bool = False) -> TokenMatch:
    """The TokenMatch whose matching keys are detect_head's pattern P[i, :] for `ids` ([T] long)."""
    ids = ids.long()
    positions = torch.arange(ids.numel())
    if kind == "previous_token":
        query, key, strict = positions, positions + 1, True  # key j matches query j + 1
    elif kind == "duplicate_token":
        query, key, strict = ids, ids.clone(), True
    elif kind == "induction":
        key = torch.cat([torch.tensor([-1]), ids[:-1]])  # key j carries t_{j-1}; key 0 never matches
        query, strict = ids, exclude_current_token
    else:
        raise HeadlabError(f"unknown pattern kind {kind!r}: choose from {', '.join(KINDS)}")
    if exclude_bos:
        key = key.clone()
        key[0] = -2
    return TokenMatch(query, key, strict)


def request(ids: torch.Tensor, config: PatternsConfig) -> StatsRequest:
    """The stats request of one input: a TokenMatch per kind, plus what the denominator needs."""
    matches = {kind: token_match(ids, kind, config.exclude_bos, config.exclude_current_token) for kind in config.kinds}
    positions = torch.arange(ids.numel())
    if config.exclude_current_token:
        matches["_diagonal"] = TokenMatch(positions, positions, strict=False)
    return StatsRequest(spans={"_bos": [0]} if config.exclude_bos else {}, matches=matches)


def input_scores(model: HeadModel, ids: torch.Tensor, config: PatternsConfig) -> dict[str, torch.Tensor]:
    """{kind: [L, H] detect_head score} of one input `ids` ([T], its BOS included)."""
    if not 1 < ids.numel() <= config.max_tokens:
        raise HeadlabError(f"an input of {ids.numel()} tokens: detect_head needs 2..{config.max_tokens} "
                           "(PatternsConfig.max_tokens)")
    with model.patched(None, request(ids, config)) as rec:
        with torch.no_grad():
            model(ids[None].to(model.device))
    st = rec.stats
    first = st.match_mass(config.kinds[0])
    kept = torch.ones(first.shape, dtype=torch.float64, device=first.device)  # per query, the row mass kept: rows sum to 1
    if config.exclude_bos:
        kept = kept - st.span_mass("_bos").double()
    if config.exclude_current_token:
        kept = kept - st.match_mass("_diagonal").double()
    if config.exclude_bos and config.exclude_current_token:
        kept[..., 0] += st.span_mass("_bos")[..., 0].double()  # query 0's only key is both the BOS and itself
    total = kept.sum(dim=-1)[:, 0]  # [L, H]
    return {kind: (st.match_mass(kind).double().sum(dim=-1)[:, 0] / total).cpu() for kind in config.kinds}


def repeated_random_tokens(model: HeadModel, n: int = 16, length: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """`n` inputs of [BOS, r_1..r_length, r_1..r_length] with r uniform over the non-special tokens."""
    tok = model.text_tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    vocab = [i for i in range(model.spec.vocab_size) if i not in special]
    bos = tok.bos_token_id if tok.bos_token_id is not None else next(iter(special), vocab[0])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        block = [rng.choice(vocab) for _ in range(length)]
        out.append(torch.tensor([bos] + block + block))
    return out


def encode_texts(model: HeadModel, texts: Sequence[str], max_tokens: int = 1024) -> list[torch.Tensor]:
    """Texts tokenized as the model's tokenizer does (its BOS included), cut to `max_tokens`."""
    out = []
    for text in texts:
        ids = model.tokenize(text, truncation=True, max_length=max_tokens)["input_ids"][0].cpu()
        if ids.numel() > 1:
            out.append(ids)
    if not out:
        raise HeadlabError("the patterns analysis needs at least one input of 2 or more tokens")
    return out


@dataclass
class PatternsResult:
    scores: dict[str, HeadScores]
    """kind -> HeadScores: the mean detect_head score over the inputs."""
    per_sample: dict[str, torch.Tensor]
    """kind -> [n_inputs, L, H]."""


def score(model: HeadModel, inputs: Sequence[torch.Tensor | Sequence[int]], config: PatternsConfig = PatternsConfig(),
          progress: bool = True, cache: MutableMapping[str, Any] | None = None, source: str = "") -> PatternsResult:
    """detect_head scores of every head for each kind, averaged over `inputs` (token-id sequences,
    each starting with the BOS; `encode_texts` / `repeated_random_tokens` make them).

    `cache` (a run's Checkpoint) keeps each finished input's scores; `source` names the inputs in
    the scores' metadata (and prefixes the cache keys, so one run can score several sources)."""
    if not inputs:
        raise HeadlabError("the patterns analysis needs at least one input")
    L, H = model.spec.shape
    per: dict[str, list[torch.Tensor]] = {k: [] for k in config.kinds}
    for i, ids in enumerate(tqdm(inputs, desc=f"patterns {source}".strip(), disable=not progress)):
        ids_t = torch.as_tensor(ids).long().cpu()
        def compute(ids_t: torch.Tensor = ids_t) -> dict[str, list]:
            return {k: v.tolist() for k, v in input_scores(model, ids_t, config).items()}

        done = cached(cache, f"{source}:{i}", compute)
        for kind in config.kinds:
            per[kind].append(torch.tensor(done[kind], dtype=torch.float64))
    params = {"exclude_bos": config.exclude_bos, "exclude_current_token": config.exclude_current_token,
              "error_measure": "mul", "source": source}
    scores = {kind: HeadScores(sums=torch.stack(v).sum(0), counts=torch.full((L, H), float(len(v)), dtype=torch.float64),
                               analysis=f"patterns:{kind}", model=model.name, params=params,
                               metadata={"inputs": len(v), "tokens": [int(torch.as_tensor(x).numel()) for x in inputs][:64]})
              for kind, v in per.items()}
    return PatternsResult(scores=scores, per_sample={k: torch.stack(v) for k, v in per.items()})


def second_copy_loss(model: HeadModel, inputs: Sequence[torch.Tensor], plan: Any = None, batch_size: int = 16) -> float:
    """Mean next-token loss on the second copy of repeated blocks ([BOS, r, r] from
    `repeated_random_tokens`), under `plan`: what induction heads bring down, and what ablating them
    raises (Olsson et al. 2022's causal check)."""
    losses = []
    for i in range(0, len(inputs), batch_size):
        batch = torch.stack([torch.as_tensor(x).long() for x in inputs[i : i + batch_size]]).to(model.device)
        half = (batch.shape[1] - 1) // 2
        with model.patched(plan), torch.no_grad():
            logits = model(batch).logits.float()
        # positions half+1 .. 2*half-1 predict the second copy's tokens 2..half (its first token is unpredictable)
        pred, target = logits[:, half + 1 : -1], batch[:, half + 2 :]
        losses.append(torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(dim=1))
    return float(torch.cat(losses).mean())


@analysis("patterns", "score",
          summary="Previous-token, duplicate-token and induction heads (TransformerLens's detect_head), from patched stats.",
          paper="Olsson et al. 2022 (induction heads); TransformerLens detect_head — METHODS.md: attention patterns",
          datasets="repeated random token blocks (--random), and texts: --data (one per line) or a real-text zoo model's "
                   "held-out code", writes=("previous_token", "duplicate_token", "induction", "per_sample", "summary"),
          files=("data",), flags={"random_inputs": "--random"},
          help={"data": "text file, one text per line (default: a real-text zoo model's held-out code; none for other "
                        "models)",
                "random_inputs": "inputs of a random token block repeated twice (0: none)",
                "length": "tokens in each random block", "exclude_bos": "detect_head's exclude_bos",
                "exclude_current_token": "detect_head's exclude_current_token", "seed": "seed of the random blocks"},
          modality="text")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        random_inputs: int = 16, length: int = 128, exclude_bos: bool = False, exclude_current_token: bool = False,
        seed: int = 0, progress: bool = True) -> Path:
    """Previous-token, duplicate-token and induction scores on repeated random tokens, and on texts."""
    from headlab import jobs
    from headlab.analyses import sinks

    params = {"data": data, "random_inputs": random_inputs, "length": length, "exclude_bos": exclude_bos,
              "exclude_current_token": exclude_current_token, "seed": seed}
    jobs.check_count(random_inputs, "--random", 0)
    jobs.check_count(length, "--length")
    if data:
        texts = sinks.build_dataset(path=data)
    elif jobs.is_corpus_model(model):
        from headlab.zoo import corpus

        texts = corpus.texts(None, 12, max_tokens=512)
    else:
        texts = []
    if not texts and not random_inputs:
        raise HeadlabError("nothing to score: give --data (a text file, one text per line) or --random N > 0")
    config = PatternsConfig(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                            max_tokens=max(1024, 2 * length + 1))
    with jobs.started(out, "patterns", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        results, summary = {}, {}
        if random_inputs:
            rnd = score(hm, repeated_random_tokens(hm, random_inputs, length, seed), config, progress=progress,
                        cache=cache, source="random")
            results.update(rnd.scores)
            run.save_per_sample(rnd.per_sample, [f"random {i}" for i in range(random_inputs)])
        if texts:
            txt = score(hm, encode_texts(hm, texts, config.max_tokens), config, progress=progress, cache=cache,
                        source="text")
            results.update({f"{k}_text": v for k, v in txt.scores.items()})
            run.save_examples([{"text": t, "label": f"text {i}"} for i, t in enumerate(texts)])
        for name, scores in results.items():
            summary[name] = [[l, h, s] for l, h, s in scores.top(5)]
        return jobs.finish(run, {"inputs": {"random": random_inputs, "texts": len(texts)}, "top_heads": summary}, results)
