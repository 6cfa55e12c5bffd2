"""Per-item results that survive an interruption: a JSON-lines key → value store.

Analyses take an optional `cache` (any MutableMapping[str, Any]); the CLI passes a
`Checkpoint` inside the run directory, so a resumed run skips every sample (or every head
evaluation of a search) that already finished. Each finished item is one appended, flushed and
fsynced line; a line torn by a kill mid-write is ignored on reload (that item is recomputed),
so the file never holds a half-written result that would be read back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any


class Checkpoint(MutableMapping[str, Any]):
    """A JSONL-backed mapping; values must be JSON-serializable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] = {}
        # a torn last line has no newline: the next entry must start on a fresh line
        self._newline_first = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._newline_first = f.read(1) != b"\n"
        if self.path.is_file():
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        entry = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                        continue  # torn by an interruption (or not ours): recompute that item
                    if isinstance(entry, dict) and "key" in entry:
                        self._data[entry["key"]] = entry["value"]

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "value": value}, allow_nan=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if self._newline_first else "") + line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._newline_first = False
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("checkpoint entries are append-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def cached(cache: MutableMapping[str, Any] | None, key: str, compute) -> Any:
    """cache[key] if present, else compute(), stored in the cache."""
    if cache is not None and key in cache:
        return cache[key]
    value = compute()
    if cache is not None:
        cache[key] = value
    return value
