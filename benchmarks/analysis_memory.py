"""Peak host memory of each analysis on one 8k-token input (CPU), against one layer's attention matrix.

    python benchmarks/analysis_memory.py --out benchmarks/results/analysis_memory_cpu.json

Each analysis runs in a fresh subprocess (the script tests/test_memory.py asserts on), so the
ru_maxrss increase is that analysis's own. The reference: the fp32 attention probabilities of
ONE layer at that length — what a silent fall-back to materialized attention would need at least.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import emit, header  # noqa: E402
from tests.test_memory import ANALYSIS_SCRIPT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/analysis_memory_cpu.json")
    args = ap.parse_args()
    rows = []
    for analysis in ("retrieval", "sinks", "select_copy"):
        out = subprocess.run([sys.executable, "-c", ANALYSIS_SCRIPT, analysis], capture_output=True, text=True, check=True,
                             cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        quadratic = r["heads"] * r["tokens"] ** 2 * 4 / 2**20
        rows.append({"analysis": analysis, "tokens": r["tokens"], "peak_increase_mib": round(r["peak_increase_mib"], 1),
                     "one_layer_attention_matrix_mib": round(quadratic, 1),
                     "ratio": round(r["peak_increase_mib"] / quadratic, 3)})
    emit({**header(), "cpu": platform.processor() or platform.machine(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
