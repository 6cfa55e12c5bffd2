"""What every benchmark result carries (date, device, versions), and how it is written."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from headlab.io import atomic_write_text
from headlab.runs import versions


def header() -> dict[str, Any]:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "versions": versions()}


def emit(result: dict[str, Any], out: Path) -> None:
    """Print the result and write it (atomically) as JSON."""
    text = json.dumps(result, indent=2)
    print(text)
    atomic_write_text(text + "\n", out)


def interleaved(configs: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median seconds, every sample) per config over `rounds` rounds that run each config once in
    turn, synchronized around each run: host-bound runs drift with the host, and interleaving
    spreads that drift over every config alike. Warm the configs first."""
    import torch

    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}, samples
