"""Studies: a model, analyses, interventions, evaluations and seeds in one TOML file, run as one
directory with its runs, a report and a manifest (`headlab study run studies/<name>.toml`).

A study file::

    [study]
    title = "Retrieval heads are sparse and causal"
    paper = "Wu et al. 2024, ..."
    model = "zoo:pycode-llama"
    seeds = [0, 1]                 # steps with a `seed` parameter run once per seed
    # device = "cuda"; dtype = "bfloat16"   (where the model runs; default cpu, float32)

    [[analysis]]                   # a declared analysis of kind "score"
    id = "retrieval"               # the step's name (default: the analysis's); runs are named after it
    run = "retrieval"
    params = { lengths = [128, 256] }
    small = { lengths = [128] }    # overrides for --size small (CI)

    [[intervention]]               # kind "intervene" (act, zerotuning, ph3, vhr, var)
    [[evaluation]]                 # kind "evaluate"; a parameter naming an earlier run takes the step's id
    run = "retrieval_masking"
    params = { scores_run = "retrieval", k = 3 }

Steps run in the order analyses, interventions, evaluations (each section in file order), so an
evaluation can name any earlier step. The study directory holds `study.toml` (the file as run), `runs/` (one run per step and seed),
`results.json` (every number of the report), `report.md` (one table per step, laid out like the
paper's main result: metric before / after, the random-head control), `report.html` (the same
with heatmaps and bar charts) and `manifest.json` (versions, seeds, the hashes of the study file,
the model's weights and every data file, each run's duration — kept runs included — and the
wall time of the last invocation). A second run of the same file on the same
machine gives identical `results.json` and `report.md`; an interrupted study resumes: finished
runs are kept, an unfinished run resumes from its checkpoint.

Every error in a study file names the file, the line and the key.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headlab import registry
from headlab.errors import HeadlabError
from headlab.io import atomic_write_json, atomic_write_text, read_json, read_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SECTIONS = {"analysis": "score", "intervention": "intervene", "evaluation": "evaluate"}
STUDY_KEYS = {"title", "paper", "model", "seeds", "description", "device", "dtype"}
STEP_KEYS = {"id", "run", "params", "small", "note"}
SIZES = ("full", "small")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StudyError(HeadlabError):
    """A problem in a study file, located: `file:line: key: message`."""

    def __init__(self, file: Path, line: int | None, key: str, message: str) -> None:
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: {key}: {message}")
        self.file, self.line, self.key = file, line, key


class _Lines:
    """Which line of a TOML text defines a key path ("analysis", 1, "params", "k").

    A plain scanner for the files studies are written as (tables, arrays of tables, keys, inline
    tables on one line): enough to point a user at the line, which tomllib does not report."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple, int] = {}
        counts: dict[str, int] = {}
        table: tuple = ()
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip() if not raw.strip().startswith('"') else raw.strip()
            if m := re.match(r"^\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]$", line):
                name = m.group(1)
                counts[name] = counts.get(name, -1) + 1
                table = (name, counts[name])
                self.where.setdefault(table, n)
                self.where.setdefault((name,), n)
            elif m := re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]$", line):
                parts = m.group(1).split(".")
                if parts[0] in counts and len(parts) > 1:  # [analysis.params]: the last element of the array
                    table = (parts[0], counts[parts[0]], *parts[1:])
                else:
                    table = tuple(parts)
                self.where.setdefault(table, n)
            elif m := re.match(r"^([A-Za-z0-9_-]+)\s*=\s*(.*)$", line):
                key = table + (m.group(1),)
                self.where.setdefault(key, n)
                for inner in re.findall(r"([A-Za-z0-9_-]+)\s*=", m.group(2)):  # an inline table's keys
                    self.where.setdefault(key + (inner,), n)

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return None


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass
class Step:
    """One analysis, intervention or evaluation of a study, its parameters checked."""

    id: str
    section: str
    decl: registry.Declaration
    params: dict[str, Any]
    small: dict[str, Any]
    path: tuple
    note: str = ""

    @property
    def seeded(self) -> bool:
        return any(p.name == "seed" for p in self.decl.params) and "seed" not in self.params

    def values(self, size: str) -> dict[str, Any]:
        return {**self.params, **(self.small if size == "small" else {})}


@dataclass
class Study:
    """A parsed, checked study file."""

    file: Path
    title: str
    model: str
    seeds: tuple[int, ...]
    steps: list[Step]
    paper: str = ""
    description: str = ""
    sha256: str = ""
    text: str = ""
    data_files: dict[str, Path] = field(default_factory=dict)
    load: dict[str, str] = field(default_factory=dict)
    """Where and in what precision the runs load the model ({"device", "dtype"}: [study] device / dtype)."""

    @property
    def name(self) -> str:
        return self.file.stem


def load(file: str | Path) -> Study:
    """Read and check a study file: its keys, each step's analysis and kind, every parameter's
    name and type, earlier-step references and data files — a StudyError names file, line, key."""
    file = Path(file)
    if not file.is_file():
        raise HeadlabError(f"study file {file} does not exist (a study is a TOML file, e.g. studies/retrieval_heads.toml)")
    text = read_text(file, "a study file (TOML)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise StudyError(file, int(m.group(1)) if m else None, "syntax", f"not valid TOML ({exc})") from None
    lines = _Lines(text)

    def fail(path: tuple, message: str) -> StudyError:
        return StudyError(file, lines.line(path), _dotted(path), message)

    for key in data:
        if key != "study" and key not in SECTIONS:
            raise fail((key,), f"unknown section; a study has [study], {', '.join(f'[[{s}]]' for s in SECTIONS)}")
    head = data.get("study")
    if not isinstance(head, dict):
        raise StudyError(file, None, "study", "missing the [study] table (title, model, seeds)")
    for key in head:
        if key not in STUDY_KEYS:
            raise fail(("study", key), f"unknown key; [study] takes {', '.join(sorted(STUDY_KEYS))}")
    for key in ("title", "model"):
        if not isinstance(head.get(key), str) or not head[key].strip():
            raise fail(("study", key), "needs a non-empty string")
    seeds = head.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise fail(("study", "seeds"), f"expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise fail(("study", "seeds"), f"seeds repeat: {seeds}")
    for key in ("device", "dtype"):
        if key in head and not isinstance(head[key], str):
            raise fail(("study", key), f"expected a string, got {head[key]!r}")
    try:
        from headlab.jobs import load_options

        load_opts = load_options(head.get("device"), head.get("dtype"))
    except HeadlabError as exc:
        raise fail(("study", "dtype" if "dtype" in str(exc) else "device"), str(exc).replace("--", "", 1)) from None
    model = head["model"]
    if not model.startswith("zoo:") and (file.parent / model).exists():
        model = str((file.parent / model).resolve())  # a local model next to the study file

    steps: list[Step] = []
    data_files: dict[str, Path] = {}
    for section in SECTIONS:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise fail((section,), f"write it as an array of tables: [[{section}]]")
        for i, entry in enumerate(entries):
            path = (section, i)
            if not isinstance(entry, dict):
                raise fail((section,), f"write each step as a table: [[{section}]] then run = \"<name>\", params = {{...}}")
            for key in entry:
                if key not in STEP_KEYS:
                    raise fail(path + (key,), f"unknown key; a step takes {', '.join(sorted(STEP_KEYS))}")
            if not isinstance(entry.get("run"), str):
                raise fail(path + ("run",), "each step names the analysis it runs: run = \"<name>\" "
                                            f"(one of {', '.join(d.name for d in registry.declarations())})")
            try:
                decl = registry.get(entry["run"])
            except registry.ParamError as exc:
                raise fail(path + ("run",), exc.detail) from None
            if SECTIONS[section] != decl.kind:
                right = {v: k for k, v in SECTIONS.items()}[decl.kind]
                raise fail(path + ("run",), f"{decl.name} is of kind {decl.kind!r}: put it under [[{right}]]")
            step_id = entry.get("id", decl.name)
            if not isinstance(step_id, str) or not _ID.match(step_id):
                raise fail(path + ("id",), f"a step id is letters, digits, '_', '-' or '.', got {step_id!r}")
            if any(s.id == step_id for s in steps):
                raise fail(path + ("id",), f"two steps are called {step_id!r}; give one an id = \"...\"")
            checked: dict[str, dict[str, Any]] = {}
            for part in ("params", "small"):
                values = entry.get(part, {})
                if not isinstance(values, dict):
                    raise fail(path + (part,), "expected a table of parameter values, e.g. { n = 16 }")
                try:
                    checked[part] = {k: decl.param(k).check(v) for k, v in values.items()}
                except registry.ParamError as exc:
                    raise fail(path + (part, exc.key), exc.detail) from None
            for p in decl.params:
                if p.required and p.name not in checked["params"]:
                    raise fail(path + ("params",), f"{decl.name} needs {p.name} ({p.describe()}): {p.help}")
                for part in ("params", "small"):
                    value = checked[part].get(p.name)
                    if value is None:
                        continue
                    if p.role == "run":
                        earlier = {s.id: s for s in steps}
                        if value not in earlier:
                            raise fail(path + (part, p.name), f"names no earlier step: {value!r} (earlier steps: "
                                                              f"{', '.join(earlier) or 'none'})")
                    elif p.role in ("file", "folder"):
                        target = Path(value) if Path(value).is_absolute() else file.parent / value
                        ok = target.is_file() if p.role == "file" else target.is_dir()
                        if not ok:
                            raise fail(path + (part, p.name), f"{p.role} not found: {value} (looked for {target}; relative "
                                                              "paths are read from the study file's folder)")
                        checked[part][p.name] = str(target.resolve())
                        data_files[f"{step_id}.{p.name}"] = target.resolve()
            note = entry.get("note", "")
            if not isinstance(note, str):
                raise fail(path + ("note",), "expected a string")
            steps.append(Step(step_id, section, decl, checked["params"], checked["small"], path, note))
    if not steps:
        raise StudyError(file, None, "study", "names no step: add an [[analysis]], [[intervention]] or [[evaluation]]")
    return Study(file=file, title=head["title"], model=model, seeds=tuple(seeds), steps=steps, load=load_opts,
                 paper=str(head.get("paper", "")), description=str(head.get("description", "")),
                 sha256=hashlib.sha256(text.encode()).hexdigest(), text=text, data_files=data_files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(target: Path) -> dict[str, str]:
    if target.is_file():
        return {target.name: _sha256(target)}
    return {str(p.relative_to(target)): _sha256(p) for p in sorted(target.rglob("*")) if p.is_file()}


def model_files(model: str) -> dict[str, str]:
    """sha256 of the model's weights and configuration files where they are on this machine
    (zoo models, local directories); a hub name not on disk gives {}."""
    if model.startswith("zoo:"):
        from headlab import zoo

        target = zoo.path(model[4:])
    else:
        target = Path(model).expanduser()
    if not target.exists():
        return {}
    return {name: digest for name, digest in _hashes(target).items()
            if name.endswith((".safetensors", ".json", ".model", ".txt", ".bin")) and "/" not in name}


@dataclass
class StudyResult:
    dir: Path
    report_md: Path
    report_html: Path
    results: dict[str, Any]


def _run_id(step: Step, seed: int | None) -> str:
    return step.id if seed is None else f"{step.id}-seed{seed}"


def _seeds(step: Step, study: Study) -> list[int | None]:
    return list(study.seeds) if step.seeded else [None]


def run(file: str | Path, out: str | Path | None = None, *, size: str = "full", plotlyjs: str = "inline",
        progress: bool = True) -> StudyResult:
    """Run (or resume) the study in `file` into `out` (default `studies-out/<name>` under the
    current directory, `-small` appended for size "small"); returns the study directory and report."""
    from headlab import jobs
    from headlab.runs import MANIFEST, read_manifest, versions

    if size not in SIZES:
        raise HeadlabError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if plotlyjs not in ("inline", "cdn"):
        raise HeadlabError(f"--plotlyjs must be inline or cdn, got {plotlyjs!r}")
    study = load(file)
    root = Path(out) if out is not None else Path("studies-out") / (study.name + ("-small" if size == "small" else ""))
    manifest_path = root / "manifest.json"
    if root.exists() and not manifest_path.is_file() and (not root.is_dir() or any(root.iterdir())):
        raise HeadlabError(f"{root} exists and is not a study directory (no manifest.json): choose a new --out "
                           "(a study writes its own folder, runs inside)")
    previous = read_json(manifest_path, "a study manifest") if manifest_path.is_file() else None
    if previous is not None and not isinstance(previous, dict):
        raise HeadlabError(f"{manifest_path} is not a study manifest (a JSON object): delete {root} or choose another --out")
    if previous is not None and (previous.get("study_sha256") != study.sha256 or previous.get("size") != size):
        raise HeadlabError(f"{root} holds a study run from {'another size' if previous.get('size') != size else 'a different version of this file'} "
                           f"({previous.get('study_file')}, size {previous.get('size')}): choose another --out, or delete "
                           f"{root} to start over")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study.text, root / "study.toml")
    t0 = time.time()
    manifest: dict[str, Any] = {
        "study": study.name, "title": study.title, "study_file": str(study.file), "study_sha256": study.sha256,
        "size": size, "model": study.model, "load": study.load, "seeds": list(study.seeds), "versions": versions(),
        "model_files_sha256": model_files(study.model),
        "data_files_sha256": {k: _sha256(p) if p.is_file() else _hashes(p) for k, p in study.data_files.items()},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "running",
        "resumed": int((previous or {}).get("resumed", -1)) + 1, "steps": [],
    }
    atomic_write_json(manifest, manifest_path)
    runs_dir = root / "runs"
    done: dict[tuple[str, int | None], Path] = {}
    try:
        for step in study.steps:
            for seed in _seeds(step, study):
                rid = _run_id(step, seed)
                values = step.values(size)
                if seed is not None:
                    values["seed"] = seed
                for p in step.decl.params:  # earlier steps by id -> their run directories
                    if p.role == "run" and values.get(p.name) is not None:
                        ref = values[p.name]
                        values[p.name] = str(done.get((ref, seed)) or done.get((ref, None)) or
                                             next(d for (i, _), d in done.items() if i == ref))
                run_dir = runs_dir / rid
                t = time.time()
                status = "kept"
                if not ((run_dir / MANIFEST).is_file() and read_manifest(run_dir).get("status") == "finished"):
                    run_dir = jobs.run(step.decl.name, study.model, runs_dir, rid, progress=progress, **study.load, **values)
                    status = "ran"
                done[(step.id, seed)] = run_dir
                took = read_manifest(run_dir).get("duration_s")  # the run's own time, also for a kept run
                manifest["steps"].append({"id": step.id, "run": step.decl.name, "seed": seed, "run_id": rid,
                                          "status": status, "seconds": took if took is not None else round(time.time() - t, 1)})
                atomic_write_json(manifest, manifest_path)
    except BaseException as exc:
        manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        atomic_write_json(manifest, manifest_path)
        raise
    results = _results(study, done)
    md = atomic_write_text(report_markdown(study, results, size), root / "report.md")
    html_path = atomic_write_text(report_html(study, results, done, size, plotlyjs), root / "report.html")
    atomic_write_json(results, root / "results.json")
    manifest.update(status="finished", seconds=round(time.time() - t0, 1),
                    run_seconds=round(sum(float(s["seconds"] or 0) for s in manifest["steps"]), 1),
                    finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest.pop("error", None)
    atomic_write_json(manifest, manifest_path)
    return StudyResult(dir=root, report_md=md, report_html=html_path, results=results)


def _step_rows(step: Step, summary: dict, run_dir: Path) -> list[dict[str, Any]]:
    """The step's table rows for one run: its declaration's paper table, else before / after /
    random heads, else (a scoring run) the top heads of each score."""
    from headlab.report import before_after, top_heads
    from headlab.runs import RunStore

    if step.decl.table is not None:
        return step.decl.table(summary)
    rows = before_after(summary)
    if rows:
        return rows
    store = RunStore(run_dir.parent)
    return [{"score": name, "top heads": top_heads(store.score(run_dir.name, name))}
            for name in store.score_names(run_dir.name)]


def _heads(summary: dict) -> str:
    """The heads an intervention changed, as its summary names them ("L1H0, L0H3"; "" if none)."""
    for where in (summary, summary.get("test") if isinstance(summary.get("test"), dict) else {}):
        for key in ("heads", "pruned", "sahara_heads"):
            value = where.get(key)
            if isinstance(value, list) and all(isinstance(h, list) and len(h) == 2 for h in value):
                return ", ".join(f"L{l}H{h}" for l, h in value) or "none"
    return ""


def _results(study: Study, done: dict[tuple[str, int | None], Path]) -> dict[str, Any]:
    """Every number of the report: per step, per seed, its rows (and the run's summary)."""
    out: dict[str, Any] = {"study": study.name, "title": study.title, "model": study.model, "steps": []}
    for step in study.steps:
        per_seed = []
        for seed in _seeds(step, study):
            run_dir = done[(step.id, seed)]
            summary = json.loads((run_dir / "summary.json").read_text())
            per_seed.append({"seed": seed, "run_id": run_dir.name, "rows": _step_rows(step, summary, run_dir),
                             "note": summary.get("note") or "", "heads": _heads(summary)})
        out["steps"].append({"id": step.id, "run": step.decl.name, "kind": step.decl.kind, "summary": step.decl.summary,
                             "paper": step.decl.paper, "note": step.note, "params": step.params, "seeds": per_seed})
    return out


def _fmt(values: list[Any]) -> str:
    """One cell over seeds: the value, or mean ± sd (n seeds) when they differ; seeds without a
    value (e.g. no random-head control where no head was chosen) are left out and counted."""
    if not values or all(v is None for v in values):
        return "—"
    present = [v for v in values if v is not None]
    nums = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) != len(present):
        first = present[0]
        return str(first) if all(v == first for v in present) else " / ".join(map(str, present))
    of = f" of {len(values)}" if len(nums) < len(values) else ""
    if all(v == nums[0] for v in nums):
        v = nums[0]
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text + (f" (n={len(nums)}{of})" if of else "")
    mean = sum(nums) / len(nums)
    sd = (sum((x - mean) ** 2 for x in nums) / (len(nums) - 1)) ** 0.5
    return f"{mean:.4g} ± {sd:.2g} (n={len(nums)}{of})"


def merged_rows(step: dict[str, Any]) -> list[dict[str, str]]:
    """A step's rows with each cell merged over seeds (rows match by position)."""
    seeds = step["seeds"]
    rows = []
    for i, first in enumerate(seeds[0]["rows"]):
        rows.append({col: _fmt([s["rows"][i].get(col) if i < len(s["rows"]) else None for s in seeds]) for col in first})
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report_markdown(study: Study, results: dict[str, Any], size: str) -> str:
    """report.md: the study's tables (no timings or dates: two runs give the same file)."""
    out = [f"# {study.title}\n", f"Study `{study.file.name}` on `{study.model}`, seeds {list(study.seeds)}, size {size}."]
    if study.paper:
        out.append(f"Paper: {study.paper}.")
    if study.description:
        out.append("\n" + study.description.strip())
    for step in results["steps"]:
        seeds = [s["seed"] for s in step["seeds"]]
        out.append(f"\n## {step['id']} ({step['kind']}: `{step['run']}`)\n")
        out.append(step["summary"] + (f" Seeds {seeds}." if seeds != [None] else ""))
        if step["note"]:
            out.append("\n" + step["note"].strip())
        out.append("\n" + _markdown_table(merged_rows(step)))
        heads = [(s["seed"], s["heads"]) for s in step["seeds"] if s["heads"]]
        if heads:
            out.append("Heads changed: " + "; ".join(h if seed is None or len(heads) == 1 else f"seed {seed}: {h}"
                                                     for seed, h in heads) + "\n")
        for note in dict.fromkeys(s["note"] for s in step["seeds"] if s["note"]):  # what the runs said of themselves
            out.append(f"Run note: {note}\n")
    return "\n".join(out).rstrip() + "\n"


def report_html(study: Study, results: dict[str, Any], done: dict[tuple[str, int | None], Path], size: str,
                plotlyjs: str) -> str:
    """report.html: the tables, each scoring step's heatmaps and a before / after / random-heads
    bar chart per intervention or evaluation (plotly, self-contained with plotlyjs="inline")."""
    import html as html_lib

    import plotly.graph_objects as go

    from headlab.runs import RunStore

    parts = [f"<h1>{html_lib.escape(study.title)}</h1>",
             f"<p>Study <code>{html_lib.escape(study.file.name)}</code> on <code>{html_lib.escape(study.model)}</code>, "
             f"seeds {list(study.seeds)}, size {size}. {html_lib.escape(study.paper)}</p>"]
    if study.description:
        parts.append(f"<p>{html_lib.escape(study.description.strip())}</p>")
    include = "cdn" if plotlyjs == "cdn" else True
    for step in results["steps"]:
        parts.append(f"<h2>{html_lib.escape(step['id'])} ({step['kind']}: {html_lib.escape(step['run'])})</h2>"
                     f"<p>{html_lib.escape(step['summary'])}</p>")
        rows = merged_rows(step)
        if rows:
            cols = list(rows[0])
            parts.append("<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>"
                         + "".join(f"<th>{html_lib.escape(c)}</th>" for c in cols) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html_lib.escape(str(r[c]))}</td>" for c in cols) + "</tr>"
                                   for r in rows) + "</table>")
        first = step["seeds"][0]
        run_dir = done[(step["id"], first["seed"])]
        figures = []
        bars = [r for r in first["rows"] if {"before", "after"} <= set(r)]
        if bars:
            fig = go.Figure([go.Bar(name=col, x=[r["metric"] for r in bars], y=[r.get(col) for r in bars])
                             for col in ("before", "after", "random heads")])
            fig.update_layout(barmode="group", title=f"{step['id']}: before / after / random heads", height=380)
            figures.append(fig)
        store = RunStore(run_dir.parent)
        for name in store.score_names(run_dir.name):
            figures.append(store.score(run_dir.name, name).plot(title=f"{step['id']}: {name}"))
        for j, fig in enumerate(figures):  # fixed div ids: the same study gives the same file
            parts.append(fig.to_html(full_html=False, include_plotlyjs=include, div_id=f"{step['id']}-{j}"))
            include = False  # plotly.js once per page
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html_lib.escape(study.title) + "</title></head>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + "\n".join(parts) + "</body></html>\n")


__all__ = ["Study", "StudyError", "StudyResult", "Step", "load", "merged_rows", "model_files", "report_markdown", "run"]
