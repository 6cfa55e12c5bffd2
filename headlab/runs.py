"""Run directories: a self-describing record of one analysis or intervention on disk.

    runs/<run id>/
        manifest.json            what, how, versions, seed, timing, status (written atomically)
        scores.safetensors       HeadScores (+ scores.json, readable)
        samples.parquet          per-sample / per-head results
        per_sample.safetensors   [n_samples, n_layers, n_heads] per-sample head scores (optional)
        examples.json            example inputs of the run, with named token spans (optional)
        figures/*.html           plotly figures

`Run` is a context manager: the manifest says "running" while the body runs, then "finished",
"interrupted" (Ctrl-C) or "failed" (with the error message). A run whose process was killed
outright stays "running" on disk; `RunStore` reports it as "interrupted" once its process is gone.

`RunStore` is the read side (what the app and notebooks use): it lists runs and loads their
files, and only ever opens files inside the runs directory it was given.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headlab.errors import HeadlabError, InputFileError
from headlab.io import (atomic_save_safetensors, atomic_write_json, atomic_write_parquet, atomic_write_text,
                        open_safetensors, read_image, read_json, safetensors_header)
from headlab.lock import RunLock, pid_alive
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


RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


def run_directory(root: str | Path, run_id: str) -> Path:
    """The directory of run `run_id` under the runs directory `root`, resolved and checked.

    The one place where a user-given run id becomes a path, for every writer (score, intervene,
    demo, any runner built on `Run`) and for `RunStore`: a run id is a plain directory name
    (letters, digits, '_', '.', '-'; no '/', no leading '.'), and the resolved path — symlinks
    followed — must sit directly under the resolved `root`."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise HeadlabError(f"invalid run id {run_id!r}: a run id is a plain directory name of letters, digits, '_', '.', '-' "
                           "(no '/', no leading '.'), for example --run-id sinks-try-2")
    base = Path(root).expanduser().resolve()
    resolved = (base / run_id).resolve()
    if resolved.parent != base:
        raise HeadlabError(f"run {run_id!r} leads outside the runs directory {base} (a symlink?); refusing to use it — "
                           "choose another --run-id")
    return resolved


class Run:
    """One run directory under `root`; created on enter, finalized on exit.

    A run is written by one process at a time: `acquire()` (done by `__enter__`, or earlier by
    `headlab.jobs.open_run` so that resuming checks happen under the lock) takes the directory's
    `RunLock`, and a second writer gets a RunLockedError naming the live process."""

    def __init__(self, root: str | Path, analysis: str, model: str, params: dict[str, Any] | None = None,
                 seed: int | None = None, run_id: str | None = None) -> None:
        if run_id is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            base_id = f"{stamp}-{_slug(analysis)}-{_slug(Path(model).name or model)}"
            run_id, n = base_id, 1
            while (Path(root) / run_id).exists():  # runs in one second: each gets its own directory
                n += 1
                run_id = f"{base_id}-{n}"
        self.id = run_id
        self.dir = run_directory(root, run_id)
        self.lock = RunLock(self.dir, run_id)
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "id": self.id, "analysis": analysis, "model": model, "params": params or {},
            "seed": seed, "status": "created", "versions": versions(), "device": platform.machine(),
            "files": {},
        }
        self._t0 = 0.0

    def acquire(self) -> "Run":
        """Create the directory and take its lock (RunLockedError if a live process holds it)."""
        self.lock.acquire()
        return self

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> "Run":
        self.acquire()
        self._t0 = time.perf_counter()
        self.manifest.update(status="running", started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             pid=os.getpid(), host=socket.gethostname())
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
        try:
            self.write_manifest()
        finally:
            self.release()

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

    def save_tensors(self, tensors: dict[str, Any], name: str, metadata: dict[str, Any] | None = None) -> Path:
        """Named tensors of the run that are not HeadScores (e.g. probe directions) as `<name>.safetensors`;
        listed in the manifest under `tensors:<name>`."""
        import torch

        meta = {"headlab": json.dumps({"format": "headlab.tensors/1", **(metadata or {})}, default=str)}
        path = atomic_save_safetensors({k: torch.as_tensor(v) for k, v in tensors.items()}, self.dir / f"{name}.safetensors",
                                       metadata=meta)
        return self._record(f"tensors:{name}", path)

    def save_json(self, obj: Any, name: str) -> Path:
        return self._record(name, atomic_write_json(obj, self.dir / f"{name}.json"))

    def save_per_sample(self, values: dict[str, Any], names: list[str] | None = None) -> Path:
        """Per-sample head scores: name -> [n_samples, n_layers, n_heads] tensor (e.g. each needle's
        copy score), so a head's score distribution over samples can be shown; `names` labels the samples."""
        import torch

        tensors = {}
        for name, v in values.items():
            t = torch.as_tensor(v, dtype=torch.float32)
            if t.dim() != 3:
                raise HeadlabError(f"per-sample scores {name!r} must be [n_samples, n_layers, n_heads], got {tuple(t.shape)}")
            tensors[name] = t
        meta = {"headlab": json.dumps({"format": "headlab.per_sample/1", "names": names or []})}
        return self._record("per_sample", atomic_save_safetensors(tensors, self.dir / "per_sample.safetensors", metadata=meta))

    def save_examples(self, examples: list[dict[str, Any]], limit: int = 24) -> Path:
        """Example inputs of the run: dicts with `text`, optional `label`, `spans` (name -> [start, end)
        token positions of the text tokenized with the model's tokenizer) and `image` (an HxWx3 uint8
        array, saved as `examples/<i>.png`, for vision-language runs). Kept to the first `limit`."""
        clean = []
        for i, ex in enumerate(examples[:limit]):
            if not isinstance(ex.get("text"), str):
                raise HeadlabError(f"an example needs a 'text' string, got {ex!r}")
            entry = {"text": ex["text"], "label": str(ex.get("label", "")),
                     "spans": {k: [int(a), int(b)] for k, (a, b) in (ex.get("spans") or {}).items()}}
            if ex.get("image") is not None:
                entry["image"] = str(self._save_png(ex["image"], f"examples/{i}.png").relative_to(self.dir))
            clean.append(entry)
        return self._record("examples", atomic_write_json(clean, self.dir / "examples.json"))

    def _save_png(self, image: Any, name: str) -> Path:
        import numpy as np

        from headlab.io import atomic_save_png

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise HeadlabError(f"an example image must be an HxWx3 uint8 array, got {array.dtype} {array.shape}")
        return atomic_save_png(array, self.dir / name)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a run directory, with a clear error when it is not one."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise HeadlabError(f"{run_dir} is not a run directory (no {MANIFEST})")
    data = read_json(path, "a headlab run manifest")
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: not a headlab run manifest (a JSON {type(data).__name__}, not an object)")
    if data.get("format") != FORMAT:
        raise HeadlabError(f"{path}: unsupported run format {data.get('format')!r}")
    for key, kind in _MANIFEST_FIELDS.items():
        if key in data and data[key] is not None and not isinstance(data[key], kind):
            raise InputFileError(f"{path}: not a headlab run manifest: field {key!r} must be "
                                 f"{_KIND_NAMES[kind]}, got {type(data[key]).__name__}")
    if any(not isinstance(v, str) for v in (data.get("files") or {}).values()):
        raise InputFileError(f"{path}: not a headlab run manifest: 'files' must map names to relative paths")
    return data


_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "analysis": str, "model": str, "params": dict, "status": str, "files": dict, "started": str,
    "finished": str, "host": str, "pid": int, "duration_s": (int, float), "summary": dict, "error": str}
_KIND_NAMES = {str: "a string", dict: "an object", int: "an integer", (int, float): "a number"}


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


_DATASET_KEYS = ("data", "needles", "harmful", "haystack")



class RunStore:
    """Read access to the run directories directly under `root`.

    Every path it opens is resolved and checked to lie inside `root` (run ids are plain names;
    a crafted id such as `../x`, an absolute path or a symlink leading out is refused), and it
    reads JSON, safetensors and parquet only — nothing is unpickled.
    """

    def __init__(self, root: str | Path) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise HeadlabError(f"runs directory {str(root)!r} does not exist: create runs with `headlab demo` "
                               "or `headlab score ...`, or point to the directory that holds them")
        self.root = path.resolve()

    # ---- paths -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        """The directory of run `run_id`, after checking the id names a run inside the root."""
        resolved = run_directory(self.root, run_id)
        if not (resolved / MANIFEST).is_file():
            raise HeadlabError(f"no run {run_id!r} in {self.root}")
        return resolved

    def file(self, run_id: str, relative: str) -> Path:
        """A file of a run (as its manifest names it), checked to lie inside that run's directory."""
        base = self.run_dir(run_id)
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            raise HeadlabError(f"run {run_id!r} names a file outside its directory ({relative!r}); refusing to read it")
        if not path.is_file():
            raise HeadlabError(f"run {run_id!r} has no file {relative!r}")
        return path

    # ---- manifests ---------------------------------------------------------------------------
    def manifest(self, run_id: str) -> dict[str, Any]:
        """The run's manifest; `status` says "interrupted" for a "running" run whose process is gone."""
        m = read_manifest(self.run_dir(run_id))
        if m.get("status") == "running" and not pid_alive(m.get("pid"), m.get("host")):
            m = {**m, "status": "interrupted", "status_note": "its process ended without finishing the run"}
        return m

    def ids(self) -> list[str]:
        return [m["id"] for m in self.list()]

    def list(self) -> list[dict[str, Any]]:
        """Manifests of every run, newest first. A run whose manifest cannot be read is listed
        too, flagged — status "unreadable" and `problem` saying why — so one bad directory is one
        flagged row, never a broken page."""
        out = []
        for child in sorted(self.root.iterdir()):
            if not RUN_ID_PATTERN.match(child.name) or not (child / MANIFEST).is_file():
                continue
            try:
                self.run_dir(child.name)
            except HeadlabError:
                continue  # a link out of the runs directory is not a run here at all
            try:
                m = self.manifest(child.name)
            except (HeadlabError, json.JSONDecodeError, OSError) as exc:
                m = {"analysis": "", "model": "", "status": "unreadable", "started": "",
                     "problem": str(exc).replace(str(self.root), "<runs>")}
            m["id"] = child.name
            out.append(m)
        return sorted(out, key=lambda m: m.get("started", ""), reverse=True)

    def table(self) -> list[dict[str, Any]]:
        """One flat row per run for a runs table: id, analysis, model, dataset, params, started,
        duration_s, status, scores (names of its HeadScores)."""
        rows = []
        for m in self.list():
            params = m.get("params") or {}
            dataset = next((str(params[k]) for k in _DATASET_KEYS if params.get(k)), "built-in")
            shown = {k: v for k, v in params.items() if k not in _DATASET_KEYS and k not in ("plan", "prompt") and v is not None}
            rows.append({
                "id": m["id"], "analysis": m.get("analysis", ""), "model": m.get("model", ""), "dataset": dataset,
                "params": json.dumps(shown, separators=(",", ":"), default=str)[:200],
                "started": (m.get("started") or "").replace("T", " ").replace("+00:00", " UTC"),
                "duration_s": m.get("duration_s"), "status": m.get("status", "?"),
                "scores": ", ".join(self._score_files(m)), "problem": m.get("problem", ""),
            })
        return rows

    # ---- contents ----------------------------------------------------------------------------
    @staticmethod
    def _score_files(manifest: dict[str, Any]) -> dict[str, str]:
        files = manifest.get("files") or {}
        return {k: v for k, v in files.items()
                if isinstance(v, str) and v.endswith(".safetensors") and k != "per_sample"
                and not k.startswith(("plan", "tensors:"))}

    def score_names(self, run_id: str) -> list[str]:
        """Names of the HeadScores the run's manifest lists (their files are not opened)."""
        return list(self._score_files(self.manifest(run_id)))

    def scores(self, run_id: str) -> dict[str, HeadScores]:
        """Every readable HeadScores the run saved, by name (a run that saved none gives {})."""
        out = {}
        for name, rel in self._score_files(self.manifest(run_id)).items():
            try:
                out[name] = HeadScores.load(self.file(run_id, rel))
            except HeadlabError:
                continue  # not a scores file (or removed since): nothing to show
        return out

    def score(self, run_id: str, name: str) -> HeadScores:
        """One HeadScores of the run (only its file is read)."""
        files = self._score_files(self.manifest(run_id))
        if name not in files:
            raise HeadlabError(f"run {run_id!r} has no scores named {name!r}; it has {sorted(files) or 'none'}")
        return HeadScores.load(self.file(run_id, files[name]))

    def per_sample(self, run_id: str) -> tuple[dict[str, Any], list[str]]:
        """({name: [n_samples, L, H] tensor}, sample names) — empty when the run kept none."""
        rel = (self.manifest(run_id).get("files") or {}).get("per_sample")
        if not rel:
            return {}, []
        path, what = self.file(run_id, rel), "a run's per-sample scores"
        with open_safetensors(path, what) as f:
            names = safetensors_header(f, path, what).get("names", [])
            return {k: f.get_tensor(k) for k in f.keys()}, list(names) if isinstance(names, list) else []

    def examples(self, run_id: str) -> list[dict[str, Any]]:
        """The run's example inputs ([] when it kept none)."""
        rel = (self.manifest(run_id).get("files") or {}).get("examples")
        if not rel:
            return []
        data = read_json(self.file(run_id, rel), "a run's examples.json")
        return [ex for ex in data if isinstance(ex, dict) and isinstance(ex.get("text"), str)] if isinstance(data, list) else []

    def example_image(self, run_id: str, example: dict[str, Any]) -> Any:
        """The example's image as an RGB PIL image (None for a text example); only PNGs inside the run."""
        rel = example.get("image")
        if not rel:
            return None
        if not str(rel).endswith(".png"):
            raise HeadlabError(f"run {run_id!r} names an example image that is not a PNG ({rel!r})")
        return read_image(self.file(run_id, rel), "a run's example image (PNG)")

    def summary(self, run_id: str) -> dict[str, Any]:
        rel = (self.manifest(run_id).get("files") or {}).get("summary")
        return read_json(self.file(run_id, rel), "a run's summary.json") if rel else {}
