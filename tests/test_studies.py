"""Analyses declared once (the registry), the generated CLI / job runner, and studies.

Covers issue 20: every analysis declares itself and the surfaces come from the declarations; the
core (`headlab/`) imports no analysis and not the app; `headlab study run` writes one study
directory that reproduces its numbers and resumes; bad study files fail with file, line and key;
every bundled study runs (small size) and reports the paper's before / after / control table.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headlab import jobs, registry, study
from headlab.errors import HeadlabError

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.toml"))
runner = CliRunner()


# ---- declarations -------------------------------------------------------------------------------

def test_every_analysis_is_declared_with_help_for_every_parameter():
    decls = registry.declarations()
    names = {d.name for d in decls}
    assert {"retrieval", "retrieval_masking", "sinks", "patterns", "probes", "select_copy", "safety", "conflict",
            "vision_heads", "act", "zerotuning", "ph3", "vhr", "var"} <= names
    for d in decls:
        assert d.summary and d.writes and d.datasets, d.name
        for p in d.params:
            assert p.help, f"{d.name}.{p.name} has no help"
            assert p.default is None or p.required or p.check(p.default) == p.default, (d.name, p.name)


def test_cli_commands_are_generated_from_the_declarations():
    from headlab.cli import app

    for d in registry.declarations():
        res = runner.invoke(app, [d.kind, d.command, "--help"])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        for p in d.params:
            assert p.cli_flag in text, (d.name, p.cli_flag)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in a file, function-level ones included, plus the string
    arguments of import_module / __import__ calls."""
    tree = ast.parse(path.read_text(), str(path))
    package = "headlab." + ".".join(path.relative_to(ROOT / "headlab").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.rstrip(".").split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            out += [(f"{module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            out += [(a.value, node.lineno) for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def test_the_core_never_imports_an_analysis_or_the_app():
    offenders = []
    for path in sorted((ROOT / "headlab").rglob("*.py")):
        for module, line in _imports(path):
            if module.startswith(("headlab.analyses", "headlab.app")):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_import_scan_sees_function_level_and_relative_imports(tmp_path):
    sub = ROOT / "headlab" / "_scan_probe.py"
    sub.write_text("def f():\n    from headlab.analyses import retrieval\n    from .app import serve\n")
    try:
        found = [m for m, _ in _imports(sub)]
    finally:
        sub.unlink()
    assert "headlab.analyses" in found and "headlab.app" in found


@pytest.fixture
def toy_analysis():
    """An analysis declared by a test module: one declaration is all the surfaces need."""

    @registry.analysis("toy_count", "score", summary="Counts to n (a test analysis).", datasets="none",
                       writes=("summary",), help={"n": "how far to count", "mode": "fast | slow"},
                       choices={"mode": ("fast", "slow")})
    def toy(model: str, out: str | Path = "runs", run_id: str | None = None, *, n: int = 3, mode: str = "fast",
            seed: int = 0, progress: bool = True) -> Path:
        with jobs.started(out, "toy_count", model, {"n": n, "mode": mode, "seed": seed}, run_id) as (run, hm):
            return jobs.finish(run, {"count": n, "seed": seed, "value_before": 0, "value_after": n + seed,
                                     "value_random": [1.0]}, {})

    yield toy.declaration
    registry._REGISTRY.pop("toy_count")


def test_a_new_declaration_runs_through_the_job_runner_and_a_study(toy_analysis, tmp_path):
    run_dir = jobs.run("toy_count", "zoo:mcqa-planted", tmp_path / "runs", n=5)
    assert json.loads((run_dir / "summary.json").read_text())["count"] == 5
    with pytest.raises(registry.ParamError, match="mode: must be one of fast, slow, got 'medium'"):
        jobs.run("toy_count", "zoo:mcqa-planted", tmp_path / "runs", mode="medium")
    with pytest.raises(registry.ParamError, match="n: expected an integer, got '5'"):
        jobs.run("toy_count", "zoo:mcqa-planted", tmp_path / "runs", n="5")
    with pytest.raises(registry.ParamError, match="toy_count has no parameter 'm'"):
        jobs.run("toy_count", "zoo:mcqa-planted", tmp_path / "runs", m=1)
    file = tmp_path / "toy.toml"
    file.write_text('[study]\ntitle = "toy"\nmodel = "zoo:mcqa-planted"\nseeds = [0, 4]\n\n'
                    '[[analysis]]\nrun = "toy_count"\nparams = { n = 2 }\n')
    result = study.run(file, tmp_path / "s", progress=False)
    rows = result.results["steps"][0]["seeds"]
    assert [r["rows"][0]["after"] for r in rows] == [2, 6]  # one run per seed, seed passed through
    assert "| value | 0 | 4 ± 2.8 (n=2) |" in result.report_md.read_text()


def test_unknown_analysis_is_named_with_a_suggestion():
    with pytest.raises(registry.ParamError, match="unknown analysis 'retrival' \\(did you mean 'retrieval'\\?\\)"):
        registry.get("retrival")


# ---- studies: reproducible, resumable, located errors -------------------------------------------

SMALL = """[study]
title = "QK-score, small"
model = "zoo:mcqa-planted"
seeds = [0]

[[analysis]]
id = "qk"
run = "select_copy"
params = { n = 16 }

[[intervention]]
id = "act"
run = "act"
params = { n = 16, draws = 1, method = "exact" }
"""


def test_a_study_run_twice_gives_identical_numbers(tmp_path):
    file = tmp_path / "small.toml"
    file.write_text(SMALL)
    a = study.run(file, tmp_path / "a", progress=False)
    b = study.run(file, tmp_path / "b", progress=False)
    assert a.report_md.read_text() == b.report_md.read_text()
    assert (a.dir / "results.json").read_text() == (b.dir / "results.json").read_text()
    manifest = json.loads((a.dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["versions"]["torch"]
    assert set(manifest["model_files_sha256"]) >= {"model.safetensors", "config.json"}
    assert (a.dir / "runs" / "qk" / "manifest.json").is_file() and (a.dir / "runs" / "act-seed0").is_dir()
    assert "<table" in a.report_html.read_text() and (a.dir / "study.toml").read_text() == SMALL


def test_an_interrupted_study_resumes_keeping_finished_runs(tmp_path, monkeypatch):
    file = tmp_path / "small.toml"
    file.write_text(SMALL)
    decl = registry.get("act")
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setitem(registry._REGISTRY, "act", registry.Declaration(**{**decl.__dict__, "run": interrupted}))
    with pytest.raises(KeyboardInterrupt):
        study.run(file, tmp_path / "s", progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and [s["id"] for s in manifest["steps"]] == ["qk"]
    monkeypatch.setitem(registry._REGISTRY, "act", decl)
    result = study.run(file, tmp_path / "s", progress=False)
    steps = json.loads((result.dir / "manifest.json").read_text())["steps"]
    assert [(s["id"], s["status"]) for s in steps] == [("qk", "kept"), ("act", "ran")]
    fresh = study.run(file, tmp_path / "fresh", progress=False)
    assert result.report_md.read_text() == fresh.report_md.read_text()
    file.write_text(SMALL.replace("n = 16 }", "n = 18 }", 1))  # the file changed: that directory is not reused
    with pytest.raises(HeadlabError, match="holds a study run from a different version of this file"):
        study.run(file, tmp_path / "s", progress=False)


@pytest.mark.parametrize("edit, line, message", [
    (lambda s: s.replace('run = "select_copy"', 'run = "select_copie"'), 8,
     r"analysis\[0\]\.run: unknown analysis 'select_copie' \(did you mean 'select_copy'\?\)"),
    (lambda s: s.replace("params = { n = 16 }", 'params = { n = "many" }'), 9,
     r"analysis\[0\]\.params\.n: expected an integer, got 'many'"),
    (lambda s: s.replace("params = { n = 16 }", "params = { n = 16, labels = \"greek\" }"), 9,
     r"analysis\[0\]\.params\.labels: must be one of digits, letters, lower, got 'greek'"),
    (lambda s: s.replace("params = { n = 16 }", 'params = { data = "missing.jsonl" }'), 9,
     r"analysis\[0\]\.params\.data: file not found: missing\.jsonl"),
    (lambda s: s.replace("params = { n = 16 }", "params = { n = 16, shots = 1.5 }"), 9,
     r"analysis\[0\]\.params\.shots: expected an integer, got 1\.5"),
    (lambda s: s.replace("params = { n = 16 }", "params = { n = 16, nn = 1 }"), 9,
     r"analysis\[0\]\.params\.nn: select_copy has no parameter 'nn'"),
    (lambda s: s.replace("[[intervention]]", "[[evaluation]]"), 13,
     r"evaluation\[0\]\.run: act is of kind 'intervene': put it under \[\[intervention\]\]"),
    (lambda s: s.replace("seeds = [0]", "seeds = 0"), 4, r"study\.seeds: expected a non-empty list of integers"),
    (lambda s: s.replace('model = "zoo:mcqa-planted"', 'model = "zoo:mcqa-planted"\nmodels = 1'), 4,
     r"study\.models: unknown key"),
    (lambda s: s.replace("seeds = [0]", "seeds = [0"), 6, r"syntax: not valid TOML \(Unclosed array"),  # tomllib's line
    (lambda s: s.replace('id = "act"', 'id = "qk"'), 12, r"intervention\[0\]\.id: two steps are called 'qk'"),
])
def test_bad_study_files_name_file_line_and_key(tmp_path, edit, line, message):
    file = tmp_path / "bad.toml"
    file.write_text(edit(SMALL))
    with pytest.raises(HeadlabError) as info:
        study.load(file)
    text = str(info.value)
    assert text.startswith(f"{file}:{line}: "), text
    assert re.search(message, text), text


def test_an_evaluation_names_an_earlier_step(tmp_path):
    file = tmp_path / "masking.toml"
    file.write_text('[study]\ntitle = "m"\nmodel = "zoo:tasks-llama"\n\n[[evaluation]]\nrun = "retrieval_masking"\n'
                    'params = { scores_run = "retrieval", k = 2 }\n')
    with pytest.raises(HeadlabError, match=r"masking.toml:7: evaluation\[0\]\.params\.scores_run: names no earlier step: "
                                           r"'retrieval' \(earlier steps: none\)"):
        study.load(file)
    file.write_text('[study]\ntitle = "m"\nmodel = "zoo:tasks-llama"\n\n[[evaluation]]\nrun = "retrieval_masking"\n'
                    'params = { k = 2 }\n')
    with pytest.raises(HeadlabError, match=r"masking.toml:7: evaluation\[0\]\.params: retrieval_masking needs scores_run"):
        study.load(file)


def test_study_cli_reports_bad_files_without_a_trace(tmp_path):
    from headlab.cli import app

    file = tmp_path / "bad.toml"
    file.write_text(SMALL.replace("params = { n = 16 }", 'params = { n = "many" }'))
    res = runner.invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{file}:9: analysis[0].params.n: expected an integer" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()  # checked before anything is written
    res = runner.invoke(app, ["study", "check", str(ROOT / "studies" / "ph3.toml")])
    assert res.exit_code == 0 and "3 steps on zoo:safety-conflict" in res.output


# ---- the bundled studies, at their small size ---------------------------------------------------

def test_there_is_one_study_per_paper_protocol():
    runs = {s.decl.name for f in STUDIES for s in study.load(f).steps}
    assert {"retrieval", "retrieval_masking", "safety", "select_copy", "act", "zerotuning", "vision_heads", "vhr",
            "ph3", "var"} <= runs


EXPECTED_COLUMNS = {
    "retrieval_heads": {"masking": {"before", "after", "random heads"}, "retrieval": {"heads", "share of all heads"}},
    "safety_heads": {"safety": {"before", "after", "random heads"}},
    "select_copy": {"select_copy": {"label-logit baseline", "best head, QK-score", "random head, QK-score"}},
    "act": {"act": {"before", "after", "random heads"}},
    "zerotuning": {"zerotuning": {"before", "after", "random heads"}},
    "vision_heads": {"vhr": {"before", "after", "random heads"}},
    "ph3": {"toward_context": {"before", "after", "random heads"}, "toward_memory": {"before", "after", "random heads"}},
    "var": {"var": {"before", "after", "random heads"}},
}


@pytest.mark.parametrize("file", STUDIES, ids=[f.stem for f in STUDIES])
def test_bundled_study_runs_small_and_reports_the_paper_table(file, tmp_path):
    local = tmp_path / file.name
    shutil.copy(file, local)
    result = study.run(local, tmp_path / "out", size="small", progress=False)
    steps = {s["id"]: s for s in result.results["steps"]}
    for step_id, columns in EXPECTED_COLUMNS[file.stem].items():
        rows = steps[step_id]["seeds"][0]["rows"]
        assert rows and columns <= set(rows[0]), (step_id, rows[:1])
        if "random heads" in columns and any(r["after"] != r["before"] for r in rows):
            # the intervention changed something: its random-head control was measured too
            assert any(r["random heads"] is not None for r in rows), (step_id, rows)
    md = result.report_md.read_text()
    assert md.count("\n## ") == len(steps) and "| metric |" in md


def test_a_study_never_writes_into_a_folder_that_is_not_its_own(tmp_path):
    file = tmp_path / "small.toml"
    file.write_text(SMALL)
    occupied = tmp_path / "runs"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("a user's file")
    with pytest.raises(HeadlabError, match="exists and is not a study directory"):
        study.run(file, occupied, progress=False)
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(HeadlabError, match="manifest.json: not valid JSON"):
        study.run(file, broken, progress=False)


def test_evaluate_retrieval_masking_from_the_cli(tmp_path):
    from headlab.cli import app

    scored = jobs.run("retrieval", "zoo:tasks-llama", tmp_path, run_id="ret", lengths=[64], depths=[0.0, 1.0],
                      progress=False)
    res = runner.invoke(app, ["evaluate", "retrieval-masking", "zoo:tasks-llama", "--out", str(tmp_path), "--scores-run",
                              str(scored), "--k", "2", "--draws", "1", "--lengths", "64", "--depths", "0.5"])
    assert res.exit_code == 0, res.output
    run_dir = Path(res.output.split("run written to ")[-1].strip())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["pruned"]) == 2 and len(summary["needle_accuracy_random"]) == 1
    assert summary["needle_accuracy_after"] <= summary["needle_accuracy_before"]
    sinks = jobs.run("sinks", "zoo:tasks-llama", tmp_path, n=2, progress=False)
    res = runner.invoke(app, ["evaluate", "retrieval-masking", "zoo:tasks-llama", "--out", str(tmp_path), "--scores-run",
                              str(sinks)])
    assert res.exit_code == 2 and "is a sinks run; this needs a retrieval run" in res.output
    res = runner.invoke(app, ["evaluate", "retrieval-masking", "zoo:mcqa-planted", "--out", str(tmp_path), "--scores-run",
                              str(scored)])
    assert res.exit_code == 2 and "scored zoo:tasks-llama, not zoo:mcqa-planted" in " ".join(res.output.split())


def test_device_and_dtype_reach_the_model_and_the_manifest(tmp_path):
    """--device / --dtype (CLI), device / dtype (study), checked first; a run resumes only in its dtype."""
    from headlab.cli import app
    from headlab.runs import read_manifest

    run_dir = jobs.run("sinks", "zoo:tasks-llama", tmp_path, run_id="s16", n=2, dtype="bfloat16", progress=False)
    assert read_manifest(run_dir)["load"] == {"device": "cpu", "dtype": "bfloat16"}
    plain = jobs.run("sinks", "zoo:tasks-llama", tmp_path, run_id="s32", n=2, progress=False)
    assert read_manifest(plain)["load"] == {"device": "cpu", "dtype": "float32"}
    for args, message in ((["--dtype", "float8"], "--dtype must be one of float32, bfloat16, float16"),
                          (["--device", "tpu:9"], "--device 'tpu:9' is not a device torch knows")):
        res = runner.invoke(app, ["score", "sinks", "zoo:tasks-llama", "--out", str(tmp_path), "--n", "2", *args])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["score", "sinks", "zoo:tasks-llama", "--out", str(tmp_path), "--device", "cuda"])
        assert res.exit_code == 2 and "no CUDA device" in res.output
    # a run interrupted in one dtype is not resumed in another
    (tmp_path / "half").mkdir()
    from headlab.runs import Run

    with Run(tmp_path / "half", "sinks", "zoo:tasks-llama", {"data": None, "n": 2, "tau": 0.1}, run_id="r"):
        pass
    manifest = json.loads((tmp_path / "half" / "r" / "manifest.json").read_text())
    manifest.update(status="interrupted", load={"device": "cpu", "dtype": "bfloat16"})
    (tmp_path / "half" / "r" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadlabError, match="it started in bfloat16, now float32; rerun with --dtype bfloat16"):
        jobs.run("sinks", "zoo:tasks-llama", tmp_path / "half", run_id="r", n=2, progress=False)
    file = tmp_path / "s.toml"
    file.write_text(SMALL.replace('seeds = [0]', 'seeds = [0]\ndtype = "float64"'))
    with pytest.raises(HeadlabError, match=r"s.toml:5: study.dtype: dtype must be one of float32, bfloat16, float16"):
        study.load(file)
    file.write_text(SMALL.replace('seeds = [0]', 'seeds = [0]\ndtype = "bfloat16"'))
    assert study.load(file).load == {"device": "cpu", "dtype": "bfloat16"}
