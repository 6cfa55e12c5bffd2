"""`headlab demo`: a patched forward and generation with an intervention and stats, saved as a run.

The demo runs on the bundled `zoo:pycode-llama`, a small Llama trained on real Python source whose
heads emerged from data (its card, `studies/zoo/card_text.py`, names them from the weights alone):
a string constant defined inside held-out code and asked for at the end (`assert name == "`),
answered once as is and once with the card's three retrieval heads pruned and ZeroTuning γ = 1.5
on another head, with per-head stats of the last queries. `demo_analyses` adds one run of each
head-scoring analysis that applies to the model (for pycode-llama: sinks, retrieval, patterns; for
the synthetic-task `zoo:tasks-llama`, which the app's tests use: sinks, retrieval, select-and-copy,
knowledge conflict), so that the app (`headlab app runs/`) has scores to show on a fresh machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer

from headlab import zoo
from headlab.analyses.code_tasks import needle_samples
from headlab.analyses.retrieval import greedy_answer, locate_needle
from headlab.errors import HeadlabError
from headlab.model import HeadModel, load_model
from headlab.plan import InterventionPlan
from headlab.runs import Run
from headlab.scores import HeadScores
from headlab.stats import StatsRequest

DEMO_MODEL = "pycode-llama"
ZEROTUNING_HEAD = (2, 4)
"""The head the demo's ZeroTuning γ = 1.5 applies to (one with some first-token mass, per the card)."""


@dataclass
class DemoResult:
    run_dir: Path
    table: Any
    kl: float
    answers: dict[str, str]
    plan_text: str


def _retrieval_heads(name: str) -> list[tuple[int, int]]:
    card = json.loads((zoo.path(name) / "card.json").read_text())
    return [(int(l), int(h)) for l, h in card["ablations"]["retrieval"]["top_heads"]]


def run_demo(out: str | Path = "runs", seed: int = 2) -> DemoResult:
    """Load the zoo model, run baseline and patched forwards with stats and greedy answers, write a run."""
    model = f"zoo:{DEMO_MODEL}"
    hm: HeadModel = load_model(model)
    example = needle_samples(hm.tokenizer, (256,), (0.5,), per_cell=1, seed=seed)[0]
    ids = hm.tokenize(example.prompt)["input_ids"]
    needle = locate_needle(ids[0].tolist(), hm.tokenizer(example.needle, add_special_tokens=False)["input_ids"])
    spans = {"first": [0], "needle": needle}
    pruned = _retrieval_heads(DEMO_MODEL)
    plan = InterventionPlan().prune_heads(pruned).scale_first_token({ZEROTUNING_HEAD: 1.5}).for_model(hm.spec)
    plan_text = (f"prune {', '.join(f'L{l}H{h}' for l, h in pruned)} (the card's top retrieval heads), "
                 f"ZeroTuning gamma=1.5 on L{ZEROTUNING_HEAD[0]}H{ZEROTUNING_HEAD[1]}")
    request = StatsRequest(argmax=True, entropy=True, spans=spans, queries=slice(-8, None))
    params = {"plan": plan.to_dict(), "spans": {k: list(v) for k, v in spans.items()}, "queries": "last 8",
              "prompt": example.prompt, "expected": example.answer}

    with Run(out, analysis="demo", model=model, params=params, seed=seed) as run:
        with hm.patched(None, request) as base:
            base_logits = hm(ids).logits[0, -1].float()
        with hm.patched(plan, request) as rec:
            logits = hm(ids).logits[0, -1].float()
        kl = float(torch.nn.functional.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="sum"))
        answers = {"expected": example.answer, "baseline": greedy_answer(hm, example.prompt, None, 8),
                   "patched": greedy_answer(hm, example.prompt, plan, 8)}
        table = per_head_table(base.stats, rec.stats)
        needle_mass = base.stats.span_mass("needle").mean(dim=(1, 3))  # [L, H]
        scores = HeadScores.from_tensor(needle_mass, "needle_attention_mass", counts=float(base.stats.query_positions.numel()),
                                        model=model, params={"queries": "last 8"})
        run.save_scores(scores)
        run.save_samples(table)
        run.save_figure(scores.plot(), "needle_attention_mass")
        run.save_examples([{"text": example.prompt, "label": f"expected {example.answer!r}", "spans": {"needle": needle}}])
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


DEMO_ANALYSES: dict[str, dict[str, dict[str, Any]]] = {
    "pycode-llama": {"sinks": {"n": 8}, "retrieval": {"lengths": [128, 256], "depths": [0.0, 0.5, 1.0]},
                     "patterns": {"random_inputs": 8}},
    "tasks-llama": {"sinks": {"n": 8}, "retrieval": {}, "select_copy": {"n": 40}, "conflict": {"n": 16}},
}
"""Per demo model, each job's arguments: small samples, seconds each on a CPU."""


def demo_analyses(out: str | Path = "runs", progress: bool = False, model: str = DEMO_MODEL) -> list[Path]:
    """One finished run per head-scoring analysis on a demo model (a key of DEMO_ANALYSES); their directories."""
    from headlab import jobs

    if model not in DEMO_ANALYSES:
        raise HeadlabError(f"no demo analyses for zoo:{model}; choose one of {sorted(DEMO_ANALYSES)}")
    return [jobs.run(name, f"zoo:{model}", out, progress=progress, **kw) for name, kw in DEMO_ANALYSES[model].items()]


def command(
    out: Path = typer.Option(Path("runs"), help="runs directory to write into"),
    seed: int = typer.Option(2, help="which code needle (the model retrieves about 2 in 3; pruning the card's retrieval "
                                      "heads breaks nearly all, per the card)"),
    analyses: bool = typer.Option(True, help="also write one run of each head-scoring analysis (for `headlab app`)"),
) -> None:
    """Patched forward + generation with an intervention and stats on zoo:pycode-llama; prints a per-head table, writes runs."""
    import pandas as pd

    result = run_demo(out=out, seed=seed)
    extra = demo_analyses(out) if analyses else []
    table = result.table
    wide = table.pivot_table(index=["layer", "head"], columns="run", values=["needle_mass", "first_mass", "entropy"])
    wide.columns = [f"{stat}:{run}" for stat, run in wide.columns]
    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.3f}".format):
        typer.echo(wide.reset_index().to_string(index=False))
    a = result.answers
    typer.echo(f"\nplan: {result.plan_text}")
    typer.echo(f"answer expected {a['expected']!r} | baseline {a['baseline']!r} | patched {a['patched']!r}")
    typer.echo(f"KL(patched || baseline) of the next token = {result.kl:.4g}")
    typer.echo(f"run written to {result.run_dir}")
    for run_dir in extra:
        typer.echo(f"analysis run written to {run_dir}")
    if extra:
        typer.echo(f"explore them: headlab app {out}")
