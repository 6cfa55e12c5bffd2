"""Run directories: a self-describing record of one analysis or intervention on disk.

    runs/<run id>/
        manifest.json        what, how, versions, seed, timing, status (written atomically)
        scores.safetensors   HeadScores (+ scores.json, readable)
        samples.parquet      per-sample / per-head results
        figures/*.html       plotly figures

`Run` is a context manager: the manifest says "running" while the body runs, then "finished",
"interrupted" (Ctrl-C) or "failed" (with the error message).
"""

from __future__ import annotations

import json
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headlab.errors import HeadlabError
from headlab.io import atomic_write_json, atomic_write_parquet, atomic_write_text
from headlab.scores import HeadScores

MANIFEST = "manifest.json"
FORMAT = "headlab.run/1"


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import torch
    import transformers

    import headlab

    return {"headlab": headlab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "run"


class Run:
    """One run directory under `root`; created on enter, finalized on exit."""

    def __init__(self, root: str | Path, analysis: str, model: str, params: dict[str, Any] | None = None,
                 seed: int | None = None, run_id: str | None = None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.id = run_id or f"{stamp}-{_slug(analysis)}-{_slug(Path(model).name or model)}"
        self.dir = Path(root) / self.id
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "id": self.id, "analysis": analysis, "model": model, "params": params or {},
            "seed": seed, "status": "created", "versions": versions(), "device": platform.machine(),
            "files": {},
        }
        self._t0 = 0.0

    def __enter__(self) -> "Run":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self.manifest.update(status="running", started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.write_manifest()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            status = "finished"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "failed"
            self.manifest["error"] = f"{exc_type.__name__}: {exc}"
        self.manifest.update(status=status, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             duration_s=round(time.perf_counter() - self._t0, 3))
        self.write_manifest()

    def write_manifest(self) -> Path:
        return atomic_write_json(self.manifest, self.dir / MANIFEST)

    def _record(self, kind: str, path: Path) -> Path:
        self.manifest["files"][kind] = str(path.relative_to(self.dir))
        self.write_manifest()
        return path

    def save_scores(self, scores: HeadScores, name: str = "scores") -> Path:
        return self._record(name, scores.save(self.dir / f"{name}.safetensors"))

    def save_samples(self, frame: Any, name: str = "samples") -> Path:
        return self._record(name, atomic_write_parquet(frame, self.dir / f"{name}.parquet"))

    def save_figure(self, figure: Any, name: str) -> Path:
        html = figure.to_html(include_plotlyjs="cdn", full_html=True)
        return self._record(f"figure:{name}", atomic_write_text(html, self.dir / "figures" / f"{name}.html"))

    def save_plan(self, plan: Any, name: str = "plan") -> Path:
        """An InterventionPlan as `<name>.json` (+ `<name>.safetensors` when it holds tensors)."""
        return self._record(name, plan.save(self.dir / name))

    def save_json(self, obj: Any, name: str) -> Path:
        return self._record(name, atomic_write_json(obj, self.dir / f"{name}.json"))


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a run directory, with a clear error when it is not one."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise HeadlabError(f"{run_dir} is not a run directory (no {MANIFEST})")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise HeadlabError(f"{path}: unsupported run format {data.get('format')!r}")
    return data


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """Manifests of the run directories directly under `root`, newest first."""
    root = Path(root)
    runs = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if (child / MANIFEST).is_file():
            try:
                runs.append(read_manifest(child))
            except (HeadlabError, json.JSONDecodeError):
                continue
    return sorted(runs, key=lambda m: m.get("started", ""), reverse=True)
