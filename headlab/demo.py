"""`headlab demo`: a patched forward and generation with an intervention and stats, saved as a run.

The demo runs on the bundled zoo model `zoo:tasks-llama` (trained on synthetic tasks, with a card
of its ablation ground truth): a needle-in-a-haystack prompt, answered once as is and once with
the card's most needle-critical head pruned and ZeroTuning γ = 1.5 on another head, with
per-head stats of the answer-side queries. `demo_analyses` adds one run of each head-scoring
analysis on the same model (sinks, retrieval, select-and-copy, knowledge conflict), so that the
app (`headlab app runs/`) has scores to show and compare on a fresh machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headlab import zoo
from headlab.model import HeadModel, load_model
from headlab.plan import InterventionPlan
from headlab.runs import Run
from headlab.scores import HeadScores
from headlab.stats import StatsRequest
from headlab.analyses.retrieval import greedy_answer
from headlab.zoo import tasks

DEMO_MODEL = "tasks-llama"


@dataclass
class DemoResult:
    run_dir: Path
    table: Any
    kl: float
    answers: dict[str, str]
    plan_text: str


def _critical_head(name: str, task: str) -> tuple[int, int]:
    card = json.loads((zoo.path(name) / "card.json").read_text())
    top = card["tasks"][task]["top_heads"][0]
    return (top["layer"], top["head"])


def run_demo(out: str | Path = "runs", seed: int = 1) -> DemoResult:
    """Load the zoo model, run baseline and patched forwards with stats and greedy answers, write a run."""
    model = f"zoo:{DEMO_MODEL}"
    hm: HeadModel = load_model(model)
    example = tasks.needle(random.Random(seed), length=(80, 160))
    ids = hm.tokenize(example.prompt)["input_ids"]
    words = ["<bos>"] + example.prompt.split()
    start = words.index("code")
    spans = {"first": [0], "needle": (start - 1, start + 7)}  # "the code of KEY is V1 V2 ."
    pruned = _critical_head(DEMO_MODEL, "needle")
    plan = InterventionPlan().prune_heads([pruned]).scale_first_token({(1, 2): 1.5}).for_model(hm.spec)
    plan_text = f"prune L{pruned[0]}H{pruned[1]} (the card's most needle-critical head), ZeroTuning gamma=1.5 on L1H2"
    request = StatsRequest(argmax=True, entropy=True, spans=spans, queries=slice(-8, None))
    params = {"plan": plan.to_dict(), "spans": {k: list(v) for k, v in spans.items()}, "queries": "last 8",
              "prompt": example.prompt, "expected": example.answer}

    with Run(out, analysis="demo", model=model, params=params, seed=seed) as run:
        with hm.patched(None, request) as base:
            base_logits = hm(ids).logits[0, -1].float()
        with hm.patched(plan, request) as rec:
            logits = hm(ids).logits[0, -1].float()
        kl = float(torch.nn.functional.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="sum"))
        answers = {"expected": example.answer, "baseline": greedy_answer(hm, example.prompt, None, 3),
                   "patched": greedy_answer(hm, example.prompt, plan, 3)}
        table = per_head_table(base.stats, rec.stats)
        needle_mass = base.stats.span_mass("needle").mean(dim=(1, 3))  # [L, H]
        scores = HeadScores.from_tensor(needle_mass, "needle_attention_mass", counts=float(base.stats.query_positions.numel()),
                                        model=model, params={"queries": "last 8"})
        run.save_scores(scores)
        run.save_samples(table)
        run.save_figure(scores.plot(), "needle_attention_mass")
        run.manifest["summary"] = {"kl_next_token": kl, "tokens": int(ids.shape[1]), "answers": answers}
    return DemoResult(run_dir=run.dir, table=table, kl=kl, answers=answers, plan_text=plan_text)


def per_head_table(base: Any, patched: Any) -> Any:
    """One row per head: first-token and needle mass, entropy and top key of the last query."""
    import pandas as pd

    rows = []
    for name, st in (("baseline", base), ("patched", patched)):
        first, needle = st.span_mass("first").mean(dim=(1, 3)), st.span_mass("needle").mean(dim=(1, 3))
        ent, top = st.entropy.mean(dim=(1, 3)), st.argmax[:, 0, :, -1]
        for li, layer in enumerate(st.layers):
            for h in range(first.shape[1]):
                rows.append({"run": name, "layer": layer, "head": h, "first_mass": float(first[li, h]),
                             "needle_mass": float(needle[li, h]), "entropy": float(ent[li, h]),
                             "last_query_top_key": int(top[li, h])})
    return pd.DataFrame(rows)


DEMO_ANALYSES: dict[str, dict[str, Any]] = {
    "score_sinks": {"n": 8},
    "score_retrieval": {},
    "score_select_copy": {"n": 40},
    "score_conflict": {"n": 16},
}
"""Each job's arguments: small samples, seconds each on a CPU."""


def demo_analyses(out: str | Path = "runs", progress: bool = False) -> list[Path]:
    """One finished run per head-scoring analysis on the demo model; returns their directories."""
    from headlab import jobs

    return [getattr(jobs, job)(f"zoo:{DEMO_MODEL}", out, progress=progress, **kw) for job, kw in DEMO_ANALYSES.items()]
