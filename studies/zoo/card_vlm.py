"""The card of the toy VLM: accuracy with / without the image, the language-prior hallucination on
conflict prompts, and every head's ablation effect on image-dependent answers (the ground truth
that VHD is checked against).

    python studies/zoo/card_vlm.py --model headlab/zoo/shapes-llava --n 48
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from headlab import InterventionPlan, load_model
from headlab.io import atomic_write_json, atomic_write_text
from headlab.zoo import shapes
from headlab.zoo.shapes_eval import answer_logprob, blank, evaluate

IMAGE_DEPENDENT = ("color", "shape", "where")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    hm = load_model(args.model)
    sets = {k: shapes.held_out(k, args.n) for k in shapes.KINDS}
    conflict = shapes.held_out("object", args.n, seed=71_000, conflict=True)
    accuracy = {k: evaluate(hm, ex)["accuracy"] for k, ex in sets.items()}
    without = {k: evaluate(hm, [blank(e) for e in ex])["accuracy"] for k, ex in sets.items() if k != "prior"}
    conflict_eval = evaluate(hm, conflict)
    image_set = [e for k in IMAGE_DEPENDENT for e in sets[k]]
    base = evaluate(hm, image_set)["accuracy"]
    base_lp = answer_logprob(hm, image_set)
    ablation = []
    for layer in range(hm.spec.n_layers):
        for head in range(hm.spec.n_heads):
            plan = InterventionPlan().prune_heads([(layer, head)])
            acc = evaluate(hm, image_set, plan)["accuracy"]
            drop = float((base_lp - answer_logprob(hm, image_set, plan)).mean())
            ablation.append({"layer": layer, "head": head, "image_accuracy": acc, "accuracy_drop": round(base - acc, 4),
                             "logprob_drop": round(drop, 5)})
            print(f"L{layer}H{head}: image accuracy {acc:.3f}, answer log-prob drop {drop:+.4f}", flush=True)
    # single heads are redundant here (accuracy barely moves): rank by the answer's log-probability drop
    ablation.sort(key=lambda r: -r["logprob_drop"])
    card = {
        "format": "headlab.card/1", "model": "shapes-llava", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_per_kind": args.n, "accuracy": accuracy, "accuracy_blank_image": without,
        "conflict": {"accuracy": conflict_eval["accuracy"], "prior_rate": conflict_eval["prior_rate"], "n": args.n},
        "image_dependent_kinds": list(IMAGE_DEPENDENT), "image_accuracy": base,
        "ablation_measure": "mean drop of log p(first answer word) on image-dependent questions when the head is pruned",
        "top_heads": ablation[:5], "ablation": ablation,
    }
    atomic_write_json(card, args.model / "card.json")
    lines = ["# zoo:shapes-llava", "", "A toy LLaVA (CLIP vision tower + projector + 4-layer Llama) trained by",
             "`studies/zoo/train_vlm.py` on `headlab.zoo.shapes`.", "",
             "| question kind | accuracy | with a blank image |", "|---|---|---|"]
    lines += [f"| {k} | {accuracy[k]:.3f} | {without[k]:.3f} |" if k in without else f"| {k} | {accuracy[k]:.3f} | (no image) |"
              for k in shapes.KINDS]
    lines += ["", f"Conflict prompts (object shown in an unusual colour): accuracy {conflict_eval['accuracy']:.3f}, "
              f"answers with the usual colour (language prior) {conflict_eval['prior_rate']:.3f}.", "",
              f"Heads whose pruning hurts image-dependent answers most (base accuracy {base:.3f}; ranked by the",
              "drop of the answer's log-probability, since single heads are redundant):", "",
              "| head | accuracy when pruned | log-prob drop |", "|---|---|---|"]
    lines += [f"| L{r['layer']}H{r['head']} | {r['image_accuracy']:.3f} | {r['logprob_drop']:+.4f} |" for r in ablation[:8]]
    atomic_write_text("\n".join(lines) + "\n", args.model / "card.md")


if __name__ == "__main__":
    main()
