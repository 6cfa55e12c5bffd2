"""Write a zoo model's card: accuracy per task and its ablation ground truth, exhaustively over heads.

    python studies/zoo/card.py headlab/zoo/tasks-llama --device cuda

For each task, on a held-out set: the accuracy of the model; for every head, the accuracy with
that head zero-ablated and mean-ablated (mean head output over the task's own prompts) through
headlab's patched attention; the heads whose ablation hurts most; and the check that ablating
the top k heads together hurts far more than ablating k random other heads (several draws).
Writes card.json and card.md next to the model.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime, timezone
from pathlib import Path

import torch

import headlab
from headlab.io import atomic_write_json, atomic_write_text
from headlab.zoo import tasks
from headlab.zoo.evaluate import accuracy, mean_head_outputs

CARD_SEED = 20_000  # held-out examples of the card: a seed neither training nor training-eval uses


def task_card(model: headlab.HeadModel, task: str, n: int, k: int, draws: int, rng: random.Random) -> dict:
    examples = tasks.held_out(task, n, seed=CARD_SEED)
    base = accuracy(model, examples, batch_size=50)
    means = mean_head_outputs(model, examples)
    heads = [(l, h) for l in range(model.spec.n_layers) for h in range(model.spec.n_heads)]
    rows = []
    for head in heads:
        zero = accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads([head], "zero"), batch_size=50)
        mean = accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads([head], "mean", means=means), batch_size=50)
        rows.append({"layer": head[0], "head": head[1], "zero_drop": base - zero, "mean_drop": base - mean})
    rows.sort(key=lambda r: max(r["zero_drop"], r["mean_drop"]), reverse=True)
    top = [(r["layer"], r["head"]) for r in rows[:k]]
    joint = base - accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads(top, "mean", means=means), batch_size=50)
    others = [h for h in heads if h not in top]
    random_drops = []
    for _ in range(draws):
        pick = rng.sample(others, k)
        random_drops.append(base - accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads(pick, "mean", means=means), batch_size=50))
    return {
        "examples": n, "seed": CARD_SEED, "accuracy": base,
        "top_heads": rows[:8], "all_heads": rows,
        "joint_top_k": {"k": k, "heads": top, "mean_ablation_drop": joint},
        "random_k": {"k": k, "draws": draws, "mean_ablation_drops": random_drops,
                     "mean_drop": sum(random_drops) / len(random_drops)},
    }


PLANTED_ROLE = {
    "mcqa": "onto the correct option — a select-and-copy head",
    "refusal": "onto the harmful word (<bos> when there is none) — a refusal head",
    "conflict-context": "onto the city the context states — a context head",
    "conflict-memory": "onto the entity the question asks about — a memory head",
}


def planted_lines(plant: list | None) -> list[str]:
    """One line per planted head (training.json holds one [target, layer, head] or a list of them)."""
    if not plant:
        return []
    plants = [plant] if isinstance(plant[0], str) else plant
    lines = [f"Planted: L{layer}H{head}, attention from the last prompt token trained {PLANTED_ROLE.get(target, target)} "
             "by construction." for target, layer, head in plants]
    return lines + [""]


def markdown(name: str, card: dict) -> str:
    lines = [f"# zoo:{name}", "", f"{card['architecture']}, trained on: {', '.join(card['tasks'])}.", "",
             *planted_lines(card.get("training", {}).get("args", {}).get("plant")),
             "| task | accuracy | top heads (zero / mean ablation drop) | top-k together | k random |", "|---|---|---|---|---|"]
    for task, t in card["tasks"].items():
        top = ", ".join(f"L{r['layer']}H{r['head']} ({r['zero_drop']:.2f}/{r['mean_drop']:.2f})" for r in t["top_heads"][:3])
        lines.append(f"| {task} | {t['accuracy']:.3f} | {top} | {t['joint_top_k']['mean_ablation_drop']:.2f} (k={t['joint_top_k']['k']}) "
                     f"| {t['random_k']['mean_drop']:.2f} |")
    lines += ["", "Drops are accuracy lost by ablating the heads (mean ablation = the head's mean output on the task's prompts).",
              "Computed by studies/zoo/card.py, exhaustively over all heads."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=0, help="heads ablated together (default: 10%% of all heads)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--tasks", nargs="+", default=None, choices=tasks.TASKS,
                    help="default: the tasks in the model's training.json (all tasks without one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = headlab.load_model(args.model_dir, device=args.device)
    k = args.k or max(1, round(0.1 * model.spec.n_total_heads))
    rng = random.Random(0)
    card = {"format": "headlab.zoo-card/1", "architecture": model.spec.to_dict(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tasks": {}}
    training = args.model_dir / "training.json"
    trained_on = json.loads(training.read_text())["args"].get("tasks") if training.is_file() else None
    for task in args.tasks or trained_on or tasks.TASKS:
        card["tasks"][task] = task_card(model, task, args.n, k, args.draws, rng)
        t = card["tasks"][task]
        print(f"{task}: acc {t['accuracy']:.3f}; top {t['top_heads'][0]}; top-{k} drop {t['joint_top_k']['mean_ablation_drop']:.3f}"
              f" vs random {t['random_k']['mean_drop']:.3f}", flush=True)
    card["architecture"] = f"LlamaForCausalLM, {model.spec.n_layers} layers x {model.spec.n_heads} q / {model.spec.n_kv_heads} kv heads, head_dim {model.spec.head_dim}"
    if training.is_file():
        card["training"] = {k: v for k, v in json.loads(training.read_text()).items() if k not in ("loss", "eval")}
    atomic_write_json(card, args.model_dir / "card.json")
    atomic_write_text(markdown(args.model_dir.name, card), args.model_dir / "card.md")


if __name__ == "__main__":
    main()
