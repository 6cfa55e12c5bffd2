"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

Definition (METHODS.md; reference code nightdessert/Retrieval_Head, retrieval_head_detection.py):
the model decodes greedily after the prompt; at the step that produces token w, a head "copies"
w when its top-1 attended key j* lies in the copy span [s, e) and prompt_ids[j*] == w; each copy
adds 1 / (e − s) to the head's score for the sample. Heads above 0.1 are retrieval heads.

As the reference counts it (`evaluate_and_log`, checked in its code):
- the copy span is the *answer* (the reference's `real_needle`), located as the first window of
  the prompt whose token-id set overlaps the answer's by more than 90% (`find_needle_idx`);
- a sample counts only when the model's response recalls more than 50% of the answer's words —
  ROUGE-1 recall with stemming (`rouge_score`, as the reference scores it) > 0.5 — and a head's
  score is the mean over those accepted samples (`head_counter` only receives accepted samples).
  `RetrievalConfig(accept="all")` keeps the mean over every sample as a named option (failed
  retrievals then dilute every head's score); `span="needle"` uses the whole needle sentence.
Named differences, for robustness, tested: the answer is searched inside the needle's own span
(the reference searches the whole prompt, where a haystack occurrence of the answer's words could
come first), with and without a leading space (a byte-level BPE tokenizes " V1" and "V1"
differently; the reference tokenizes the answer alone), and — where the prompt's tokens merge the
answer with its neighbours — by the tokenizer's character offsets instead of token ids.

How it runs here: one greedy generation (`headlab.generate.greedy_tokens`: `generate()`'s tokens;
on a GPU each decode step replayed from a CUDA graph) inside `HeadModel.patched(None,
StatsRequest(argmax=True, queries=slice(-1, None)))`. The prefill computes the prompt at full speed
and only the last prompt position's argmax is kept — that row is exactly the reference's first
decode step (whose input is the last prompt token) — and each later decode step emits one argmax
per head: O(N) per step, never `output_attentions`. Decoding stops at <eos>, a newline token or
`max_new_tokens`.

Teacher-forced variant (`teacher_forced=True`): one forward pass over prompt + reference answer,
argmax on the answer window, w = the answer's tokens. When the model's greedy answer equals the
reference answer both give the same attention rows, hence the same scores (tested).
"""

from __future__ import annotations

import random
import weakref
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, MutableMapping, Sequence

import torch
from tqdm.auto import tqdm

from headlab.checkpoint import cached
from headlab.datasets import records_to, text_field
from headlab.errors import HeadlabError
from headlab.generate import greedy_tokens
from headlab.io import read_text
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.jobs import COMMON_HELP
from headlab.registry import analysis
from headlab.scores import HeadScores
from headlab.stats import StatsRequest


@dataclass(frozen=True)
class RetrievalConfig:
    """Parameters with the paper's defaults."""

    threshold: float = 0.1
    """Heads scoring above this are retrieval heads."""
    overlap: float = 0.9
    """Needle location: first window whose token set overlaps the needle's by more than this."""
    max_new_tokens: int = 16
    teacher_forced: bool = False
    accept: Literal["recall", "all"] = "recall"
    """Which samples a head's score averages: "recall" (the reference: the response's ROUGE-1 recall
    of the answer > `min_recall`) or "all" (every sample)."""
    min_recall: float = 0.5
    span: Literal["answer", "needle"] = "answer"
    """The copy span: the answer's tokens (the reference's real_needle) or the whole needle sentence."""

    def __post_init__(self) -> None:
        if self.accept not in ("recall", "all"):
            raise HeadlabError(f"accept must be 'recall' (the reference's rule) or 'all', got {self.accept!r}")
        if self.span not in ("answer", "needle"):
            raise HeadlabError(f"span must be 'answer' (the reference's) or 'needle', got {self.span!r}")
        if not 0.0 <= self.min_recall < 1.0:
            raise HeadlabError(f"min_recall must be in [0, 1), got {self.min_recall}")


@dataclass(frozen=True)
class NeedleSample:
    """A needle-in-a-haystack prompt: the needle sentence is inside `prompt`; `answer` copies from it."""

    prompt: str
    needle: str
    answer: str
    meta: dict = field(default_factory=dict)


def locate_needle(prompt_ids: Sequence[int], needle_ids: Sequence[int], overlap: float = 0.9) -> tuple[int, int]:
    """[s, e): the first window of len(needle) whose token-id set overlaps the needle's by > `overlap`."""
    target = set(needle_ids)
    n = len(needle_ids)
    for s in range(len(prompt_ids) - n + 1):
        if len(set(prompt_ids[s : s + n]) & target) / len(target) > overlap:
            return s, s + n
    raise HeadlabError("the needle does not occur in the tokenized prompt (no window overlaps it by > 90%)")


PROMPT = "{context}\n\nQuestion: {question}\nAnswer:"
"""Prompt of `build_dataset`; the answer is generated after "Answer:"."""


def build_dataset(needles: str | Path, haystack: str | Path, lengths: Iterable[int] = (1000, 2000, 4000),
                  depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0), template: str = PROMPT) -> list[NeedleSample]:
    """Needle samples from user files: a context-length × depth grid for every needle.

    `needles`: JSONL/CSV rows {"needle": sentence inserted in the haystack, "question": str,
    "answer": str (text the model should copy from the needle)}. `haystack`: a UTF-8 text file;
    lengths are counted in haystack words (the file repeats when a length exceeds it); the
    needle goes in at word round(depth · length).
    """
    def convert(record: dict) -> dict:
        row = {k: text_field(record, k) for k in ("needle", "question", "answer")}
        if row["answer"].strip() not in row["needle"]:
            raise ValueError(f"'answer' {row['answer']!r} does not occur in 'needle'; the retrieval score counts copies from the needle")
        return row

    rows = records_to(needles, convert)
    path = Path(haystack)
    words = read_text(path, "a UTF-8 haystack text to fill the context with").split()
    if not words:
        raise HeadlabError(f"haystack file {path} is empty")
    samples = []
    for row in rows:
        for length in lengths:
            hay = (words * (length // len(words) + 1))[:length]
            for depth in depths:
                if not 0.0 <= depth <= 1.0:
                    raise HeadlabError(f"depth {depth} is outside [0, 1] (a fraction of the context)")
                at = round(depth * length)
                context = " ".join(hay[:at] + [row["needle"]] + hay[at:])
                samples.append(NeedleSample(template.format(context=context, question=row["question"]), row["needle"],
                                            row["answer"], {"length": length, "depth": depth}))
    return samples


def zoo_dataset(lengths: Iterable[int] = (64, 128, 256, 512), depths: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                per_cell: int = 2, seed: int = 0) -> list[NeedleSample]:
    """A context-length × depth grid of the zoo's needle task (haystack words, "the code of KEY is V1 V2 .")."""
    from headlab.zoo import tasks

    rng = random.Random(seed)
    samples = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                hay = [rng.choice(tasks.FILLER) for _ in range(length)]
                key, values = rng.choice(tasks.KEYS), [rng.choice(tasks.VALUES) for _ in range(2)]
                needle = ["the", "code", "of", key, "is", *values, "."]
                at = round(depth * length)
                words = hay[:at] + needle + hay[at:] + ["question", ":", "what", "is", "the", "code", "of", key, "?", "answer", ":"]
                samples.append(NeedleSample(" ".join(words), " ".join(needle), " ".join(values),
                                            {"length": length, "depth": depth, "key": key}))
    return samples


def answer_span(tok: Any, prompt: str, prompt_ids: Sequence[int], needle: tuple[int, int], answer: str,
                overlap: float = 0.9) -> tuple[int, int]:
    """[s, e) of the answer's tokens inside the needle span `needle`.

    First as the reference finds its `real_needle` (the token-set overlap rule, with the answer
    tokenized alone and with a leading space); where the prompt's tokens merge the answer with its
    neighbours (a byte-level BPE joins `"juniper"` differently from `juniper"`), the tokens whose
    characters overlap the answer's first occurrence inside the needle (the tokenizer's offsets)."""
    ns, ne = needle
    for text in (answer, " " + answer.lstrip()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids and len(ids) <= ne - ns:
            try:
                s, e = locate_needle(prompt_ids[ns:ne], ids, overlap)
            except HeadlabError:
                continue
            return ns + s, ns + e
    try:
        offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets is not None and len(offsets) == len(prompt_ids):
        # the overlap rule's window can sit a token early: let the answer run past it by its own length
        target = answer.strip()
        start = prompt.find(target, offsets[ns][0], offsets[ne - 1][1] + len(target))
        if start >= 0:
            end = start + len(target)
            inside = [i for i in range(ns, len(offsets)) if offsets[i][0] < end and offsets[i][1] > start]
            if inside:
                return inside[0], inside[-1] + 1
    raise HeadlabError(f"the answer {answer!r} does not occur in the tokenized needle; the retrieval score counts copies "
                       "of the answer's tokens from the needle")


_ROUGE = None


def answer_recall(answer: str, response: str) -> float:
    """ROUGE-1 recall of `answer`'s words in `response` with Porter stemming — the reference's
    `rouge_scorer.RougeScorer(['rouge1'], use_stemmer=True).score(real_needle, response)` (÷ 100)."""
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ModuleNotFoundError:
            raise HeadlabError("the retrieval score's acceptance rule needs rouge-score: pip install rouge-score "
                               "(or RetrievalConfig(accept='all'))") from None
        _ROUGE = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return float(_ROUGE.score(answer, response)["rouge1"].recall)


@dataclass
class RetrievalResult:
    scores: HeadScores
    samples: Any
    """DataFrame: one row per sample (generated answer, correct, needle span, per-sample top head)."""
    per_sample: torch.Tensor | None = None
    """[n_samples, L, H] each sample's copy score (the distribution behind the mean)."""
    accepted: list[int] = field(default_factory=list)
    """Indices of the samples the scores average (all of them with accept="all")."""

    def retrieval_heads(self, threshold: float | None = None):
        return self.scores.to_mask(threshold=self.scores.params.get("threshold", 0.1) if threshold is None else threshold)


_STOPS: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


def _stop_ids(model: HeadModel) -> set[int]:
    """<eos> and every token whose text holds a newline: decoding stops at a newline, as the
    reference's does (its stop is Llama's newline byte token; a byte-level BPE merges the newline
    into tokens such as `"\n` or `\n\n`, so one "\n" token would miss most of them)."""
    tok = model.text_tokenizer
    try:
        cached_ids = _STOPS.get(tok)
    except TypeError:  # not weak-referenceable
        cached_ids = None
    if cached_ids is None:
        size = len(tok) if hasattr(tok, "__len__") else model.spec.vocab_size
        texts = tok.batch_decode([[i] for i in range(size)])
        cached_ids = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        try:
            _STOPS[tok] = cached_ids
        except TypeError:
            pass
    return ({tok.eos_token_id} - {None}) | set(cached_ids)


def sample_scores(model: HeadModel, sample: NeedleSample, config: RetrievalConfig,
                  plan: InterventionPlan | None = None) -> tuple[torch.Tensor, dict]:
    """[L, H] retrieval score of one sample (decoded under `plan`, if any), and a record of what was
    generated: the answer's ROUGE-1 recall and whether the sample is accepted."""
    tok = model.text_tokenizer
    prompt_ids = tok(sample.prompt)["input_ids"]
    needle_ids = tok(sample.needle, add_special_tokens=False)["input_ids"]
    s, e = locate_needle(prompt_ids, needle_ids, config.overlap)
    if config.span == "answer":
        s, e = answer_span(tok, sample.prompt, prompt_ids, (s, e), sample.answer, config.overlap)
    ids = torch.tensor([prompt_ids], device=model.device)
    n = len(prompt_ids)
    if config.teacher_forced:
        answer = tok(sample.answer, add_special_tokens=False)["input_ids"]
        full = torch.tensor([prompt_ids + answer], device=model.device)
        with model.patched(plan, StatsRequest(argmax=True, queries=list(range(n - 1, n - 1 + len(answer))))) as rec:
            model(full)
        produced = answer
    else:
        stops = _stop_ids(model)
        with model.patched(plan, StatsRequest(argmax=True, queries=slice(-1, None))) as rec:
            out = greedy_tokens(model, ids, config.max_new_tokens, eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id)
        produced = out[0, n:].tolist()  # the stop token too: the reference scores and decodes it (then strips)
        while produced and produced[-1] == tok.pad_token_id != tok.eos_token_id:
            produced.pop()
    top = rec.stats.argmax[:, 0]  # [L, H, steps]
    prompt = torch.tensor(prompt_ids)
    score = torch.zeros(top.shape[:2], dtype=torch.float64)
    for t, w in enumerate(produced[: top.shape[-1]]):
        j = top[..., t]
        inside = (j >= s) & (j < e)
        copied = inside & (prompt[j.clamp(max=n - 1)] == w)
        score += copied.double() / (e - s)
    generated = tok.decode(produced, skip_special_tokens=True).strip()
    recall = answer_recall(sample.answer, generated) if config.accept == "recall" else float("nan")
    record = {"generated": generated, "answer": sample.answer, "correct": generated == sample.answer.strip(),
              "recall": recall, "accepted": config.accept == "all" or recall > config.min_recall,
              "needle_start": s, "needle_end": e, "prompt_tokens": n, **sample.meta}
    return score, record


def score(model: HeadModel, samples: Sequence[NeedleSample], config: RetrievalConfig = RetrievalConfig(),
          progress: bool = True, cache: MutableMapping[str, Any] | None = None,
          plans: Sequence[InterventionPlan | None] | None = None) -> RetrievalResult:
    """Retrieval score of every head: the mean copy score over the accepted samples (see the module
    docstring; `config.accept`). `plans` (one per sample, None for none) decodes samples under
    interventions — e.g. to see how ablations change which samples are retrieved.

    `cache` (e.g. a run's `Checkpoint`) keeps each finished sample's scores: a resumed run skips them.
    """
    import pandas as pd

    if not samples:
        raise HeadlabError("the retrieval analysis needs at least one needle sample")
    if plans is not None and len(plans) != len(samples):
        raise HeadlabError(f"plans must give one plan (or None) per sample: {len(plans)} plans for {len(samples)} samples")
    L, H = model.spec.shape
    total = torch.zeros(L, H, dtype=torch.float64)
    rows, per_sample, accepted = [], [], []
    for i, sample in enumerate(tqdm(samples, desc="retrieval", disable=not progress)):
        def compute(sample=sample, plan=None if plans is None else plans[i]):
            per, record = sample_scores(model, sample, config, plan)
            return {"scores": per.tolist(), "record": record}

        done = cached(cache, str(i), compute)
        per, record = torch.tensor(done["scores"], dtype=torch.float64), done["record"]
        if record["accepted"]:
            total += per
            accepted.append(i)
        per_sample.append(per)
        best = int(per.argmax())
        rows.append({"sample": i, **record, "top_layer": best // H, "top_head": best % H, "top_score": float(per.max())})
    scores = HeadScores(sums=total, counts=torch.full((L, H), float(len(accepted)), dtype=torch.float64),
                        analysis="retrieval", model=model.name,
                        params={"threshold": config.threshold, "teacher_forced": config.teacher_forced,
                                "max_new_tokens": config.max_new_tokens, "accept": config.accept,
                                "min_recall": config.min_recall, "span": config.span},
                        metadata={"samples": len(samples), "accepted": accepted})
    return RetrievalResult(scores=scores, samples=pd.DataFrame(rows), per_sample=torch.stack(per_sample), accepted=accepted)


def shard(ref: str, samples: Sequence[NeedleSample], config: RetrievalConfig, keys: list[str]) -> dict[str, Any]:
    """A Ray shard of `score` (`headlab.distributed`): keys are sample indices; each value is what
    `score` checkpoints for that sample, computed on the worker's copy of model `ref`."""
    from headlab.distributed import worker_model

    model = worker_model(ref)
    out = {}
    for k in keys:
        per, record = sample_scores(model, samples[int(k)], config, None)
        out[k] = {"scores": per.tolist(), "record": record}
    return out


def greedy_answer(model: HeadModel, prompt: str, plan: InterventionPlan | None = None, max_new_tokens: int = 16) -> str:
    """The model's greedy continuation of `prompt` up to <eos> / newline, under `plan`."""
    tok = model.text_tokenizer
    ids = model.tokenize(prompt)["input_ids"]
    with model.patched(plan):
        out = greedy_tokens(model, ids, max_new_tokens, eos_token_id=sorted(_stop_ids(model)), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def needle_accuracy(model: HeadModel, samples: Sequence[NeedleSample], plan: InterventionPlan | None = None,
                    max_new_tokens: int = 16) -> float:
    """Fraction of samples whose greedy answer (to <eos> / newline) equals the reference answer."""
    hits = sum(greedy_answer(model, s.prompt, plan, max_new_tokens) == s.answer.strip() for s in samples)
    return hits / len(samples)


def masking_test(model: HeadModel, samples: Sequence[NeedleSample], scores: HeadScores, k: int,
                 draws: int = 3, seed: int = 0) -> dict:
    """The paper's causal test: needle accuracy with the top-k retrieval heads pruned vs k random heads."""
    top = [(l, h) for l, h, _ in scores.top(k)]
    rng = random.Random(seed)
    others = [(l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1]) if (l, h) not in top]
    return {
        "k": k,
        "top_heads": top,
        "baseline": needle_accuracy(model, samples),
        "top_pruned": needle_accuracy(model, samples, InterventionPlan().prune_heads(top)),
        "random_pruned": [needle_accuracy(model, samples, InterventionPlan().prune_heads(rng.sample(others, k)))
                          for _ in range(draws)],
    }


def _needle_dataset(model: str, needles: str | None, haystack: str | None, lengths: list[int] | None,
                    depths: list[float] | None, seed: int = 0) -> list[NeedleSample]:
    """The job's samples: the user's needles in their haystack, or the bundled model's own task."""
    from headlab import jobs

    bad = [x for x in lengths or [] if x < 1]
    if bad:
        raise HeadlabError(f"--lengths must be positive integers (context lengths), got {bad}")
    bad = [x for x in depths or [] if not 0.0 <= x <= 1.0]
    if bad:
        raise HeadlabError(f"--depths must be fractions of the context in [0, 1], got {bad}")
    if needles or haystack:
        if not (needles and haystack):
            raise HeadlabError("give both --needles (JSONL/CSV of needle, question, answer) and --haystack (a text file)")
        return build_dataset(needles, haystack, lengths or (1000, 2000, 4000), depths or (0.0, 0.5, 1.0))
    if jobs.is_zoo_task_model(model):
        return zoo_dataset(lengths or (64, 256), depths or (0.0, 0.5, 1.0), per_cell=2, seed=seed)
    if jobs.is_corpus_model(model):
        from headlab.analyses import code_tasks

        return code_tasks.needle_samples(None, lengths or (128, 256, 512, 896), depths or (0.0, 0.25, 0.5, 0.75, 1.0),
                                         per_cell=2, seed=seed)
    raise HeadlabError(f"{model} is not a zoo task model: give --needles and --haystack files")


def sparsity_table(summary: dict) -> list[dict]:
    """The paper's sparsity finding: how many heads score above the threshold, and which lead."""
    top = ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in summary["top_heads"][:5]) or "(no sample retrieved)"
    return [{"metric": "heads with retrieval score > 0.1", "heads": summary["heads_above_threshold"],
             "share of all heads": summary["fraction_of_heads_above_threshold"],
             "needle accuracy while scoring": summary["accuracy"], "top heads": top}]


_NEEDLE_HELP = {"needles": "JSONL/CSV with needle, question, answer",
                "haystack": "text file that fills the context",
                "lengths": "context lengths (haystack words)", "depths": "needle depths in [0, 1]"}


@analysis("retrieval", "score", summary="Retrieval heads (Wu et al. 2024): copy score during greedy decoding of the needle.",
          paper="Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality (METHODS.md: retrieval heads)",
          datasets="needle-in-a-haystack: --needles (JSONL/CSV of needle, question, answer) + --haystack (text); zoo task "
                   "and real-text zoo models bring their own",
          writes=("scores", "samples", "per_sample", "examples", "summary"), files=("needles", "haystack"),
          help={**_NEEDLE_HELP, "teacher_forced": "one forward pass over prompt + answer instead of decoding",
                "max_new_tokens": "tokens decoded per needle",
                "accept": "recall: average the samples whose answer recalls > 50% of the needle's answer words (the "
                          "reference) | all: every sample",
                **COMMON_HELP},
          choices={"accept": ("recall", "all")}, modality="text", table=sparsity_table)
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, needles: str | None = None,
        haystack: str | None = None, lengths: list[int] | None = None, depths: list[float] | None = None,
        teacher_forced: bool = False, max_new_tokens: int = 16, accept: str = "recall",
        ray: str | None = None, shards: int = 4, ray_gpus: float = 0, progress: bool = True) -> Path:
    from headlab import jobs
    from headlab.distributed import shard_work

    jobs.check_ray(ray, shards)
    jobs.check_count(max_new_tokens, "--max-new-tokens")
    config = RetrievalConfig(teacher_forced=teacher_forced, max_new_tokens=max_new_tokens, accept=accept)  # type: ignore[arg-type]
    params = {"needles": needles, "haystack": haystack, "lengths": lengths, "depths": depths,
              "teacher_forced": teacher_forced, "max_new_tokens": max_new_tokens, "accept": accept}
    samples = _needle_dataset(model, needles, haystack, lengths, depths)
    with jobs.started(out, "retrieval", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        jobs.shard_on_ray(cache, [str(i) for i in range(len(samples))], shard_work(shard, model, samples, config),
                          ray, shards, ray_gpus, progress)
        result = score(hm, samples, config, progress=progress, cache=cache)
        heads = [[l, h, s] for l, h, s in result.scores.top(10)] if result.accepted else []
        above = int((result.scores.values > config.threshold).sum()) if result.accepted else 0
        summary = {"samples": len(samples), "accuracy": float(result.samples["correct"].mean()),
                   "accept": accept, "accepted_samples": len(result.accepted), "accepted": result.accepted,
                   "top_heads": heads, "retrieval_heads": [[l, h] for l, h, s in heads if s > config.threshold],
                   "heads_above_threshold": above, "fraction_of_heads_above_threshold": above / hm.spec.n_total_heads}
        if not result.accepted:
            summary["note"] = ("no sample was retrieved (answer recall <= 0.5 everywhere): no head has a score; "
                               "check the needles, or use --accept all")
        run.save_per_sample({"scores": result.per_sample}, [f"sample {i}" for i in range(len(samples))])
        run.save_examples([{"text": s.prompt, "label": f"sample {i}: answer {s.answer!r}",
                            "spans": {"needle": (int(r["needle_start"]), int(r["needle_end"]))}}
                           for i, (s, r) in enumerate(zip(samples, result.samples.to_dict("records")))])
        return jobs.finish(run, summary, {"scores": result.scores}, result.samples)


@analysis("retrieval_masking", "evaluate",
          summary="The retrieval-head masking test: needle accuracy with a retrieval run's top-k heads pruned vs k random heads.",
          paper="Wu et al. 2024, section 4 (masking out retrieval heads vs random heads)",
          datasets="fresh needles of the same kind as the scoring run's (another seed), or --needles + --haystack",
          writes=("summary",), files=("needles", "haystack"), runs=("scores_run",),
          help={**_NEEDLE_HELP, "scores_run": "the retrieval run whose top-k heads are pruned (its directory; in a "
                                              "study, the step's id)",
                "k": "heads pruned", "draws": "random k-head sets (the control)",
                "seed": "seed of the fresh needles and of the random heads", "max_new_tokens": "tokens decoded per needle"},
          modality="text")
def masking_job(model: str, out: str | Path = "runs", run_id: str | None = None, *, scores_run: str,
                needles: str | None = None, haystack: str | None = None, lengths: list[int] | None = None,
                depths: list[float] | None = None, k: int = 4, draws: int = 3, seed: int = 1, max_new_tokens: int = 16,
                progress: bool = True) -> Path:
    from headlab import jobs

    jobs.check_count(k, "--k")
    jobs.check_count(draws, "--draws")
    scores = jobs.earlier_scores(scores_run, "retrieval", model, "scores")
    if k >= scores.values.numel():
        raise HeadlabError(f"--k {k} leaves no head for the random control: the model has {scores.values.numel()} heads")
    samples = _needle_dataset(model, needles, haystack, lengths, depths, seed=seed + 1000)
    params = {"scores_run": str(scores_run), "needles": needles, "haystack": haystack, "lengths": lengths,
              "depths": depths, "k": k, "draws": draws, "seed": seed, "max_new_tokens": max_new_tokens}
    with jobs.started(out, "retrieval_masking", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        top = [(l, h) for l, h, _ in scores.top(k)]
        rng = random.Random(seed)
        others = [(l, h) for l in range(scores.shape[0]) for h in range(scores.shape[1]) if (l, h) not in top]
        sets = {"before": None, "after": top, **{f"random{i}": rng.sample(others, k) for i in range(draws)}}

        def accuracy(heads: list | None) -> float:
            plan = InterventionPlan().prune_heads(heads) if heads else None
            return needle_accuracy(hm, samples, plan, max_new_tokens)

        acc = {name: cached(cache, name, lambda heads=heads: accuracy(heads))
               for name, heads in tqdm(sets.items(), desc="masking", disable=not progress)}
        summary = {"samples": len(samples), "k": k, "pruned": [list(h) for h in top],
                   "random_heads": [[list(h) for h in sets[f"random{i}"]] for i in range(draws)],
                   "needle_accuracy_before": acc["before"], "needle_accuracy_after": acc["after"],
                   "needle_accuracy_random": [acc[f"random{i}"] for i in range(draws)]}
        return jobs.finish(run, summary, {})
