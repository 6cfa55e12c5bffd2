"""Every analysis on `zoo:pycode-llama`, the model trained on real Python source (CPU, ~4 minutes).

    python studies/real_text/run_study.py [--runs studies/real_text/runs]

Runs each applicable analysis as a headlab run directory (the same jobs as `headlab score` /
`headlab intervene`), then writes `studies/real_text/results/summary.json` (every number, with
versions, date and the command), `results/report.md` (the tables of the README) and
`results/figures/*.html` (plotly heatmaps). The run directories stay in `--runs` (not committed).
Seeds are fixed: a second run on the same machine reproduces the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import headlab
from headlab import jobs
from headlab.compare import compare
from headlab.io import atomic_write_json, atomic_write_text
from headlab.runs import RunStore, versions

MODEL = "zoo:pycode-llama"
HERE = Path(__file__).parent
NOT_APPLICABLE = {
    "select-and-copy heads (QK-score)": "the model was trained on Python source only: no multiple-choice questions, "
                                        "no option labels to copy (`headlab score select-copy zoo:pycode-llama` says so)",
    "safety heads (Ships / Sahara)": "no refusal behaviour to remove: nothing in Python source teaches refusing",
    "PH3 (knowledge conflict)": "no memorized facts to put in conflict with a context; its path-patching step is run on "
                                "the copying task instead (below)",
    "vision-aware heads (VHD / VHR), VAR": "a text-only model",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(HERE / "runs"))
    args = ap.parse_args()
    runs = Path(args.runs)
    if runs.exists():
        shutil.rmtree(runs)  # a fresh study: the numbers must come from this code and these weights
    t0 = time.time()
    done: dict[str, Path] = {}

    def step(name: str, analysis: str, **kw) -> None:
        t = time.time()
        done[name] = jobs.run(analysis, MODEL, runs, run_id=name, progress=False, **kw)
        print(f"[{time.time() - t0:6.1f}s] {name} ({time.time() - t:.1f}s)", flush=True)

    step("patterns", "patterns", random_inputs=16, length=128)
    step("retrieval", "retrieval")  # 4 lengths x 5 depths x 2 needles
    step("sinks", "sinks", n=12)
    step("act", "act", n=160)
    step("zerotuning", "zerotuning", n=160)
    step("copy_patching", "conflict", n=24)

    controls = random_controls(done)
    store = RunStore(runs)
    summary = {name: json.loads((path / "summary.json").read_text()) for name, path in done.items()}
    scores = {name: store.scores(name) for name in done}
    ind, prev = scores["patterns"]["induction"], scores["patterns"]["previous_token"]
    ret, patch = scores["retrieval"]["scores"], scores["copy_patching"]["context_heads"]
    first = scores["sinks"]["first_token_mass"]
    table = compare([ind, ret, patch, first, prev], k=5,
                    names=["induction", "retrieval", "copy path patching", "first-token mass", "previous token"])
    figures = HERE / "results" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, s in {"induction": ind, "previous_token": prev, "retrieval": ret, "copy_path_patching": patch,
                    "first_token_mass": first, "act_gain": scores["act"]["act_gain"],
                    "zerotuning_gain_up": scores["zerotuning"]["gain_up"]}.items():
        atomic_write_text(s.plot().to_html(include_plotlyjs="cdn", full_html=True), figures / f"{name}.html")

    result = {
        "model": MODEL, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python studies/real_text/run_study.py", "versions": versions(), "seconds": round(time.time() - t0, 1),
        "summaries": summary,
        "top": {name: [[l, h, round(v, 4)] for l, h, v in s.top(8)] for name, s in
                {"induction": ind, "previous_token": prev, "duplicate_token": scores["patterns"]["duplicate_token"],
                 "induction_text": scores["patterns"]["induction_text"], "retrieval": ret, "copy_path_patching": patch,
                 "first_token_mass": first}.items()},
        "comparison": table.round(4).to_dict("records"),
        "not_applicable": NOT_APPLICABLE,
        "random_controls": controls,
        "card": json.loads((headlab.zoo.path("pycode-llama") / "card.json").read_text())["ablations"],
    }
    atomic_write_json(result, HERE / "results" / "summary.json")
    atomic_write_text(report(result), HERE / "results" / "report.md")
    print(f"study written to {HERE / 'results'} in {result['seconds']} s")


def random_controls(runs: dict[str, Path], draws: int = 3, seed: int = 0) -> dict:
    """Test accuracy with ACT / ZeroTuning applied to as many random heads as each chose (same splits,
    same β or γ): the control the papers' head selection is measured against."""
    import random

    from headlab.analyses import choice

    from headlab import InterventionPlan

    model = headlab.load_model(MODEL)
    out = {}
    for name, path in runs.items():
        if name not in ("act", "zerotuning"):
            continue
        manifest = json.loads((path / "manifest.json").read_text())
        p = manifest["params"]
        _, test = choice.job_splits(MODEL, None, p["n"], p["calibration_fraction"], p["seed"])
        chosen = [tuple(h) for h in json.loads((path / "summary.json").read_text())["heads"]]
        L, H = model.spec.shape
        layers = range(2, L - 1) if name == "act" else range(L)
        pool = [(l, h) for l in layers for h in range(H) if (l, h) not in chosen]
        rng = random.Random(seed)
        accs = []
        for _ in range(draws if chosen else 0):
            heads = rng.sample(pool, len(chosen))
            if name == "act":
                plan = InterventionPlan().act(heads, beta=p["beta"], tau=p["tau"])
            else:
                gamma = json.loads((path / "summary.json").read_text())["gamma"]
                plan = InterventionPlan().scale_first_token({h: gamma for h in heads})
            accs.append(round(choice.accuracy(model, test, plan), 4))
        out[name] = accs
    return out


def _heads(rows, n=5) -> str:
    return ", ".join(f"L{l}H{h} {v:.2f}" for l, h, v in rows[:n])


def report(r: dict) -> str:
    s, top, card = r["summaries"], r["top"], r["card"]
    act, zt, ret, cp = s["act"], s["zerotuning"], s["retrieval"], s["copy_patching"]
    mean = lambda xs: sum(xs) / len(xs)
    lines = [
        f"Measured {r['date']} by `{r['command']}` (headlab {r['versions']['headlab']}, torch {r['versions']['torch']}, "
        f"transformers {r['versions']['transformers']}, CPU, {r['seconds']} s).",
        "",
        "### Heads found, per analysis (top 5)",
        "| analysis | input | top heads |",
        "|---|---|---|",
        f"| induction (detect_head) | 16 random blocks of 128 tokens, repeated | {_heads(top['induction'])} |",
        f"| induction (detect_head) | 12 held-out code chunks | {_heads(top['induction_text'])} |",
        f"| previous token | random blocks | {_heads(top['previous_token'])} |",
        f"| duplicate token | random blocks | {_heads(top['duplicate_token'])} |",
        f"| retrieval (Wu et al.) | {ret['samples']} code needles, {ret['accepted_samples']} accepted | {_heads(top['retrieval'])} |",
        f"| path patching, copy task (→ logits) | {cp['pairs']} clean/corrupted pairs, clean logit diff {cp['clean_logit_difference']:.2f} | "
        f"{_heads(top['copy_path_patching'])} |",
        f"| first-token mass | 12 code chunks | {_heads(top['first_token_mass'])} |",
        "",
        "### Agreement between analyses (top-5 Jaccard, Spearman over all 48 heads)",
        "| a | b | shared top-5 | Jaccard | Spearman |",
        "|---|---|---|---|---|",
        *[f"| {row['a']} | {row['b']} | {row['shared_topk']} | {row['jaccard_topk']:.2f} | {row['spearman']:.2f} |"
          for row in r["comparison"]],
        "",
        "### Causal checks (the card's ablations, fresh inputs)",
        "| heads | metric | intact | top-3 zero | top-3 mean | 3 random, zero (mean of 5) |",
        "|---|---|---|---|---|---|",
        *[f"| {kind} {', '.join(f'L{l}H{h}' for l, h in c['top_heads'])} | {c['metric']} | {c['baseline']:.3f} | "
          f"{c['top_zero']:.3f} | {c['top_mean']:.3f} | {mean(c['random_zero']):.3f} |" for kind, c in card.items()],
        "",
        "### Interventions on the bracket task (which of `)` `]` `}` closes here; held-out code, calibration / test halves)",
        "| method | heads chosen | calibration before → after | test before → after | test, as many random heads |",
        "|---|---|---|---|---|",
        f"| ACT (β 0.4, τ 0.1; layers 2..L−2) | {len(act['heads'])}: {', '.join(f'L{l}H{h}' for l, h in act['heads'][:6])} | "
        f"{act['calibration_accuracy_before']:.3f} → {act['calibration_accuracy_after']:.3f} | "
        f"{act['test']['accuracy_before']:.3f} → {act['test']['accuracy_after']:.3f} | {_random(r, 'act')} |",
        f"| ZeroTuning (supervised, γ {zt['gamma']}, {zt['direction']}) | {len(zt['heads'])}: "
        f"{', '.join(f'L{l}H{h}' for l, h in zt['heads'][:6])} | {zt['calibration_objective_before']:.3f} → "
        f"{zt['calibration_objective_after']:.3f} | {zt['test']['accuracy_before']:.3f} → {zt['test']['accuracy_after']:.3f} | "
        f"{_random(r, 'zerotuning')} |",
        "",
        "### Not applicable",
        *[f"- **{k}**: {v}." for k, v in r["not_applicable"].items()],
        "",
    ]
    return "\n".join(lines)


def _random(r: dict, name: str) -> str:
    accs = r["random_controls"].get(name) or []
    return ", ".join(f"{x:.3f}" for x in accs) if accs else "— (no head chosen)"


if __name__ == "__main__":
    main()
