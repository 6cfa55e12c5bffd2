"""VHR on the toy VLM: accuracy where the image contradicts the text prior, where they agree, and
POPE metrics, for several α (k = 2 heads per layer, chosen by VHD at every step).

    python studies/vision/vhr_toy.py --out benchmarks/results/vhr_shapes_llava.json
"""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

from headlab import load_model
from headlab.analyses import vision_heads as vh
from headlab.io import atomic_write_json
from headlab.runs import versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    args = ap.parse_args()
    hm = load_model("zoo:shapes-llava")
    sets = {"conflict": vh.zoo_questions(("object",), args.n, seed=71_000, conflict=True),
            "agree": vh.zoo_questions(("object",), args.n, seed=72_000, conflict=False),
            "pope": vh.zoo_questions(("pope",), args.n)}
    results = {}
    for name, questions in sets.items():
        base = vh.evaluate(hm, questions)
        base.pop("rows")
        results[name] = {"baseline": base}
        for alpha in args.alphas:
            out = vh.evaluate(hm, questions, alpha=alpha, k=args.k)
            out.pop("rows")
            results[name][f"alpha={alpha:g}"] = out
            print(name, alpha, out["accuracy"], flush=True)
    atomic_write_json({"model": "zoo:shapes-llava", "k": args.k, "n_per_set": args.n, "results": results,
                       "device": "cpu", "machine": platform.machine(), "versions": versions(),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.out)


if __name__ == "__main__":
    main()
