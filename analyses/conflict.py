"""Knowledge-conflict heads and PH3 (Jin et al., ACL 2024, "Cutting Off the Head Ends the Conflict").

A conflict sample is a prompt whose context states a value (the *context answer*) that differs
from what the model has memorized (the *memory answer*). Heads are found by path patching to the
logits (`headlab.analyses.patching`) with the metric

    LD = logit(memory answer) − logit(context answer)     at the last prompt token

(first token of each answer). The corrupted prompt of a pair keeps the template and swaps both
the subject and the context value for unrelated ones, so a head that carries the memorized fact
(or the context value) carries something else there. Patching a head's output from it changes LD
by Δ_h; averaged over the pairs:

- memory heads push the memory answer: patching them lowers LD — memory score = −Δ_h;
- context heads push the context answer: patching them raises LD — context score = +Δ_h.

PH3 prunes (zero output) the top-k context heads to make the model follow memory, or the top-k
memory heads to make it follow the context. Rates, as the paper reports them: the memorization
rate RM (fraction of greedy answers equal to the memory answer) and the context rate RC
(fraction equal to the context answer). k is given, or chosen on a calibration set as the
smallest k that maximizes the target rate.

Named choices (the paper does not fix them all in a form code can follow): Δ_h is the raw mean
change of LD (not normalized by the clean LD); answers are compared by their first token for
scoring and by the generated text (its first words, case-insensitive) for the rates.

Datasets: JSONL/CSV with `prompt`, `memory_answer`, `context_answer` and `corrupted_prompt` (same
number of tokens as `prompt`); for zoo models, the zoo's conflict task ("report" contexts the
model follows, "rumor" contexts it ignores).
"""

from __future__ import annotations

import random
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from headlab.analyses import patching
from headlab.analyses.choice import continuation_token_ids
from headlab.generate import greedy_generate

from headlab.datasets import records_to, text_field
from headlab.errors import HeadlabError
from headlab.jobs import COMMON_HELP, METHODS
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.scores import HeadScores

Head = tuple[int, int]
Toward = Literal["context", "memory"]


@dataclass(frozen=True)
class ConflictSample:
    prompt: str
    memory: str
    context: str
    corrupted: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory.strip() == self.context.strip():
            raise ValueError(f"memory and context answers are both {self.memory!r}: a conflict sample needs two different answers")


def _from_record(record: dict[str, Any]) -> ConflictSample:
    return ConflictSample(text_field(record, "prompt"), text_field(record, "memory_answer"),
                          text_field(record, "context_answer"), text_field(record, "corrupted_prompt"))


def build_dataset(path: str | Path | None = None, samples: Sequence[ConflictSample] | None = None) -> list[ConflictSample]:
    """Samples from a list, or a JSONL/CSV file with prompt, memory_answer, context_answer, corrupted_prompt."""
    if path is not None:
        return records_to(path, _from_record)
    if not samples:
        raise HeadlabError("a conflict analysis needs samples: pass `samples` or a dataset `path`")
    return list(samples)


def zoo_dataset(n: int, modes: Sequence[str] = ("report", "rumor"), seed: int = 50_000) -> list[ConflictSample]:
    """Conflict prompts of the zoo task, `modes` in turn, each with its corrupted twin."""
    from headlab.zoo import tasks

    if not modes or set(modes) - {"report", "rumor"}:
        raise HeadlabError(f"modes must be drawn from 'report' and 'rumor' (prompts with a conflicting context), got {list(modes)}")
    table = tasks.facts()
    rng = random.Random(seed)
    out = []
    per_mode = [tasks.held_out("conflict", (n + len(modes) - 1) // len(modes), seed=seed + i, mode=m) for i, m in enumerate(modes)]
    for i in range(n):
        ex = per_mode[i % len(modes)][i // len(modes)]
        entity = ex.prompt.split()[2]
        memory, context = ex.meta["memory"], ex.meta["context"]
        other = rng.choice([e for e in tasks.ENTITIES if table[e] not in (memory, context) and e != entity])
        city = rng.choice([c for c in tasks.CITIES if c not in (memory, context, table[other])])
        corrupted = " ".join(other if w == entity else city if w == context else w for w in ex.prompt.split())
        out.append(ConflictSample(ex.prompt, memory, context, corrupted, {"mode": ex.meta["mode"]}))
    return out


def answer_tokens(model: HeadModel, samples: Sequence[ConflictSample]) -> torch.Tensor:
    """[N, 2] first token of (memory answer, context answer) after each prompt."""
    return torch.tensor([continuation_token_ids(model, s.prompt, [s.memory, s.context]) for s in samples])


def logit_difference(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """LD = logit(memory) − logit(context) per row; targets [B, 2] = (memory, context) token ids."""
    picked = logits.gather(1, targets)
    return picked[:, 0] - picked[:, 1]


@dataclass
class ConflictHeads:
    effect: HeadScores
    """Mean ΔLD of patching each head (negative: memory head; positive: context head)."""
    memory: HeadScores
    context: HeadScores
    clean_ld: float
    per_pair: torch.Tensor
    estimate: HeadScores | None = None
    """method="atp": the attribution estimate of every head's mean ΔLD."""


def find_heads(model: HeadModel, samples: Sequence[ConflictSample], batch_size: int = 32, progress: bool = True,
               cache: MutableMapping[str, Any] | None = None, method: str = "exact", verify: int = 32) -> ConflictHeads:
    """Path patching (each head → logits) on the samples' clean/corrupted pairs. method="atp":
    attribution estimates of every head, the `verify` largest |ΔLD| patched exactly
    (`patching.scan`); only those carry memory / context scores, the rest stay unmeasured."""
    samples = build_dataset(samples=samples)
    pairs = patching.make_pairs(model, [s.prompt for s in samples], [s.corrupted for s in samples], answer_tokens(model, samples))
    result = patching.scan(model, pairs, logit_difference, batch_size=batch_size, progress=progress, cache=cache,
                           name="conflict_effect", method=method, verify=verify)
    eff = result.per_pair.mean(0)
    measured = result.exact.double()
    params = {"n": len(samples), "metric": "logit(memory) - logit(context)", "receivers": "logits",
              **{k: v for k, v in result.effect.params.items() if k in ("method", "verify", "verification")}}

    def scores(values: torch.Tensor, name: str) -> HeadScores:
        return HeadScores.from_tensor(values, name, counts=measured, model=model.name, params=params)

    return ConflictHeads(
        effect=scores(eff, "conflict_effect"), memory=scores(-eff, "memory_heads"), context=scores(eff, "context_heads"),
        clean_ld=float(result.clean_metric.mean()), per_pair=result.per_pair, estimate=result.estimate)


def ph3_plan(heads: ConflictHeads, toward: Toward, k: int) -> InterventionPlan:
    """Prune the top-k memory heads (toward="context") or context heads (toward="memory")."""
    if toward not in ("context", "memory"):
        raise HeadlabError(f"toward must be 'context' or 'memory', got {toward!r}")
    if k < 1:
        raise HeadlabError(f"k must be >= 1 (heads to prune), got {k}")
    scores = heads.memory if toward == "context" else heads.context
    return InterventionPlan().prune_heads([(l, h) for l, h, s in scores.top(k) if s > 0])


def rates(model: HeadModel, samples: Sequence[ConflictSample], plan: InterventionPlan | None = None,
          max_new_tokens: int = 8, batch_size: int = 32) -> dict:
    """Memorization rate RM and context rate RC of the greedy answers under `plan`."""
    texts = greedy_generate(model, [s.prompt for s in samples], plan, max_new_tokens, batch_size)

    def said(text: str, answer: str) -> bool:
        # Whole words: "c1" must not match an answer "c12".
        want = answer.lower().split()
        return text.lower().split()[: len(want)] == want

    mem = [said(t, s.memory) for t, s in zip(texts, samples)]
    ctx = [said(t, s.context) for t, s in zip(texts, samples)]
    return {"n": len(samples), "memory_rate": sum(mem) / len(samples), "context_rate": sum(ctx) / len(samples),
            "answers": texts}


@dataclass
class PH3Result:
    toward: Toward
    k: int
    plan: InterventionPlan
    pruned: list[Head]
    selection: list[dict]
    """Calibration rates for each k tried."""


def ph3(model: HeadModel, samples: Sequence[ConflictSample], heads: ConflictHeads, toward: Toward,
        k: int | None = None, max_k: int = 8) -> PH3Result:
    """The PH3 plan: prune k heads (k given, or the smallest k in 1..max_k with the highest target
    rate on `samples`, a calibration set)."""
    target = "context_rate" if toward == "context" else "memory_rate"
    ks = [k] if k is not None else list(range(1, max_k + 1))
    tried = []
    for kk in ks:
        plan = ph3_plan(heads, toward, kk)
        r = rates(model, samples, plan)
        tried.append({"k": kk, "memory_rate": r["memory_rate"], "context_rate": r["context_rate"]})
    best = max(tried, key=lambda t: (t[target], -t["k"]))
    plan = ph3_plan(heads, toward, best["k"])
    return PH3Result(toward=toward, k=best["k"], plan=plan, pruned=sorted(plan.head_scales), selection=tried)


def evaluate(model: HeadModel, samples: Sequence[ConflictSample], plan: InterventionPlan, random_draws: int = 3,
             seed: int = 0) -> dict:
    """RM and RC before and after `plan`, and after pruning as many random heads (the control)."""
    pruned = sorted(plan.head_scales)
    L, H = model.spec.shape
    rng = random.Random(seed)
    others = [(l, h) for l in range(L) for h in range(H) if (l, h) not in pruned]
    before = rates(model, samples)
    after = rates(model, samples, plan)
    rand = [rates(model, samples, InterventionPlan().prune_heads(rng.sample(others, len(pruned))))
            for _ in range(random_draws)] if pruned else []
    strip = lambda r: {k: v for k, v in r.items() if k != "answers"}
    return {"pruned": [list(h) for h in pruned], "before": strip(before), "after": strip(after),
            "random": [strip(r) for r in rand],
            "answers": [{"prompt": s.prompt, "memory": s.memory, "context": s.context, "before": b, "after": a}
                        for s, b, a in zip(samples, before["answers"], after["answers"])]}


def job_samples(model: str, data: str | None, n: int) -> list[ConflictSample]:
    """A conflict job's pairs: the user's file, the zoo's conflict task, or (real-text model) the copying task."""
    from headlab import jobs

    if data:
        return build_dataset(path=data)
    if jobs.zoo_task(model, "conflict"):
        return zoo_dataset(n)
    if jobs.is_corpus_model(model):  # the copying task: "context" = the needle's value, "memory" = the corrupted one
        from headlab.analyses import code_tasks

        return code_tasks.copy_pairs(None, n)
    raise HeadlabError(f"{model} is not a zoo model trained on the conflict task: give --data (JSONL/CSV with prompt, "
                       "memory_answer, context_answer, corrupted_prompt)")


_HELP = {"data": "JSONL/CSV with prompt, memory_answer, context_answer, corrupted_prompt", **COMMON_HELP}
_DATASETS = ("knowledge-conflict pairs: JSONL/CSV with prompt, memory_answer, context_answer, corrupted_prompt (--data); "
             "zoo models trained on the conflict task and the real-text model (a copying task) bring their own")


@analysis("conflict", "score", summary="Knowledge-conflict heads: path patching each head to the logits; memory vs context heads.",
          paper="Jin et al. 2024, Cutting Off the Head Ends the Conflict (PH3), step 1 — METHODS.md: path patching",
          datasets=_DATASETS, writes=("conflict_effect", "memory_heads", "context_heads", "conflict_effect_estimate", "summary"),
          files=("data",), choices={"method": METHODS}, help={**_HELP, "n": "zoo pairs when no --data"}, modality="text")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        n: int = 64, method: str = "auto", verify: int = 32, progress: bool = True) -> Path:
    """Memory and context heads by path patching each head to the logits (PH3's first step)."""
    from headlab import jobs

    jobs.check_method(method, verify, "--verify")
    samples = job_samples(model, data, n)
    params = {"data": data, "n": n, "method": method, "verify": verify}
    with jobs.started(out, "conflict", model, params, run_id) as (run, hm):
        heads = find_heads(hm, samples, progress=progress, cache=jobs.checkpoint(run), method=method, verify=verify)
        summary = {"pairs": len(samples), "clean_logit_difference": heads.clean_ld,
                   "memory_heads": [[l, h, s] for l, h, s in heads.memory.top(5) if s > 0],
                   "context_heads": [[l, h, s] for l, h, s in heads.context.top(5) if s > 0],
                   **jobs.search_summary(heads.effect.params)}
        scores = {"conflict_effect": heads.effect, "memory_heads": heads.memory, "context_heads": heads.context}
        if heads.estimate is not None:
            scores["conflict_effect_estimate"] = heads.estimate
        return jobs.finish(run, summary, scores)


@analysis("ph3", "intervene",
          summary="PH3 (Jin et al. 2024): prune memory or context heads found by path patching; memory/context rates before/after.",
          paper="Jin et al. 2024, Cutting Off the Head Ends the Conflict (PH3) — METHODS.md: PH3",
          datasets=_DATASETS, writes=("memory_heads", "context_heads", "plan", "answers", "summary"), files=("data",),
          choices={"toward": ("context", "memory"), "method": METHODS},
          help={**_HELP, "toward": "context (prune memory heads) | memory (prune context heads)",
                "n": "zoo pairs when no --data", "k": "heads to prune (default: chosen on the calibration split)",
                "max_k": "largest k tried when choosing k"}, modality="text")
def ph3_job(model: str, out: str | Path = "runs", run_id: str | None = None, *, toward: str,
            data: str | None = None, n: int = 128, k: int | None = None, max_k: int = 8,
            calibration_fraction: float = 0.5, seed: int = 0, method: str = "auto", verify: int = 32,
            progress: bool = True) -> Path:
    """PH3: find memory/context heads on a calibration split, prune toward context or memory, evaluate on the rest."""
    import pandas as pd

    from headlab import jobs
    from headlab.analyses import select_copy
    from headlab.model import load_spec

    if toward not in ("context", "memory"):
        raise HeadlabError(f"--toward must be 'context' or 'memory', got {toward!r}")
    jobs.check_fraction(calibration_fraction)
    jobs.check_count(max_k, "--max-k")
    jobs.check_method(method, verify, "--verify")
    if k is not None:
        jobs.check_count(k, "--k")
    samples = job_samples(model, data, n)
    cal_idx, test_idx = select_copy.split(len(samples), calibration_fraction, seed)
    cal, test = [samples[i] for i in cal_idx], [samples[i] for i in test_idx]
    params = {"toward": toward, "data": data, "n": n, "k": k, "max_k": max_k,
              "calibration_fraction": calibration_fraction, "seed": seed, "method": method, "verify": verify}
    spec = load_spec(model)
    if (k or max_k) > spec.n_layers * spec.n_heads:
        raise HeadlabError(f"--{'k' if k else 'max-k'} {k or max_k} is more than the model's {spec.n_layers * spec.n_heads} heads")
    with jobs.started(out, "ph3", model, params, run_id) as (run, hm):
        heads = find_heads(hm, cal, progress=progress, cache=jobs.checkpoint(run), method=method, verify=verify)
        result = ph3(hm, cal, heads, toward, k=k, max_k=max_k)  # type: ignore[arg-type]
        evaluation = evaluate(hm, test, result.plan, seed=seed)
        run.save_plan(result.plan)
        run.save_samples(pd.DataFrame(evaluation.pop("answers")), "answers")
        summary = {"toward": toward, "k": result.k, "pruned": [list(h) for h in result.pruned],
                   "k_selection": result.selection, "test": evaluation, **jobs.search_summary(heads.effect.params)}
        return jobs.finish(run, summary, {"memory_heads": heads.memory, "context_heads": heads.context})
