"""What every benchmark result carries (date, device, versions), and how it is written."""

from __future__ import annotations

import json
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
