"""Reliability: run ids never lead outside the runs directory, every bad file gets a clear error, one
writer per run (a lock a killed process never leaves stuck)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headlab.cli import app
from headlab.errors import HeadlabError, InputFileError, PlanError, RunLockedError
from headlab.lock import RunLock
from headlab.runs import Run, RunStore, read_manifest, run_directory

runner = CliRunner()

# every command that writes a run, with the arguments that get it past its dataset (zoo tasks)
WRITERS = [
    ["score", "retrieval", "zoo:tasks-llama"],
    ["score", "sinks", "zoo:tasks-llama", "--n", "2"],
    ["score", "select-copy", "zoo:tasks-llama", "--n", "8"],
    ["score", "safety", "zoo:tasks-llama", "--n", "2"],
    ["score", "conflict", "zoo:tasks-llama", "--n", "2"],
    ["score", "vision-heads", "zoo:shapes-llava", "--n", "1"],
    ["intervene", "act", "zoo:tasks-llama", "--n", "8"],
    ["intervene", "zerotuning", "zoo:tasks-llama", "--n", "8"],
    ["intervene", "ph3", "zoo:tasks-llama", "--toward", "context", "--n", "4"],
    ["intervene", "vhr", "zoo:shapes-llava", "--n", "1"],
    ["intervene", "var", "zoo:shapes-llava", "--n", "1"],
]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---- 1. run ids --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../etc", "../x", "/tmp/headlab-abs", "a/b", ".hidden", "..", "", "a\0b", "x" * 300])
def test_run_directory_refuses_non_plain_ids(tmp_path, bad):
    with pytest.raises(HeadlabError, match="invalid run id"):
        run_directory(tmp_path / "runs", bad)


def test_run_directory_refuses_a_symlink_leading_out(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(HeadlabError, match="leads outside the runs directory"):
        run_directory(root, "link")
    assert run_directory(root, "plain-name_1.2") == (root / "plain-name_1.2").resolve()


def test_library_run_refuses_escaping_ids(tmp_path):
    with pytest.raises(HeadlabError, match="invalid run id"):
        Run(tmp_path / "runs", "demo", "zoo:tasks-llama", run_id="../escape")
    assert _tree(tmp_path) == set()


@pytest.mark.parametrize("command", WRITERS, ids=lambda c: "-".join(c[:2]))
def test_every_writer_refuses_escaping_run_ids(tmp_path, command):
    root = tmp_path / "a" / "b" / "runs"
    for bad in ("../../escape", str(tmp_path / "absolute")):
        result = runner.invoke(app, [*command, "--out", str(root), "--run-id", bad])
        assert result.exit_code == 2, result.output
        assert "invalid run id" in result.output and "Traceback" not in result.output
    assert _tree(tmp_path) == set(), "nothing may be written anywhere"


def test_writer_refuses_a_symlinked_run_id(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    result = runner.invoke(app, ["score", "sinks", "zoo:tasks-llama", "--out", str(root), "--run-id", "link"])
    assert result.exit_code == 2 and "leads outside the runs directory" in result.output
    assert list(outside.iterdir()) == []


def test_automatic_ids_in_the_same_second_get_their_own_directories(tmp_path):
    with Run(tmp_path, "demo", "zoo:tasks-llama") as a, Run(tmp_path, "demo", "zoo:tasks-llama") as b:
        assert a.dir != b.dir and a.dir.parent == b.dir.parent == tmp_path.resolve()


# ---- 3. one writer per run -----------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from headlab.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_and_a_killed_writer_leaves_no_stuck_lock(tmp_path):
    run_dir = tmp_path / "runs" / "same"
    proc = _hold(run_dir)
    try:
        with pytest.raises(RunLockedError, match=rf"process {proc.pid} on {socket.gethostname()}"):
            RunLock(run_dir).acquire()
        # the CLI refuses it too, before loading anything, with the live process named
        result = runner.invoke(app, ["score", "sinks", "zoo:tasks-llama", "--n", "2", "--out", str(tmp_path / "runs"),
                                     "--run-id", "same"])
        assert result.exit_code == 2 and f"being written by process {proc.pid}" in result.output
        assert not (run_dir / "progress.jsonl").exists() and not (run_dir / "manifest.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(run_dir) as lock:  # kill -9 released it: the next writer goes ahead
        assert lock.held
    assert RunLock(run_dir).acquire().held  # and released again on exit


def test_resume_checks_happen_under_the_lock(tmp_path):
    """Two runs on one id with different arguments: the second is refused whether or not the first
    has written its manifest yet (the check reads it under the lock)."""
    from headlab import jobs

    first = jobs.open_run(tmp_path, "sinks", "zoo:tasks-llama", {"n": 2}, "same")
    try:
        with pytest.raises(RunLockedError):
            jobs.open_run(tmp_path, "sinks", "zoo:tasks-llama", {"n": 8}, "same")
    finally:
        first.release()
    with first:
        pass  # the first run writes its manifest ("finished")
    with pytest.raises(HeadlabError, match="already finished"):
        jobs.open_run(tmp_path, "sinks", "zoo:tasks-llama", {"n": 2}, "same")


def test_lock_file_fallback_detects_stale_locks_by_pid_and_host(tmp_path, monkeypatch):
    """Where flock is unavailable the lock file itself is the lock: a dead holder on this host is stale."""
    import headlab.lock as lock_module

    monkeypatch.setattr(lock_module, "fcntl", None)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    lock = RunLock(run_dir).acquire()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError, match=rf"process {os.getpid()}"):
        RunLock(run_dir).acquire()
    lock.release()
    assert not (run_dir / ".lock").exists()
    (run_dir / ".lock").write_text(json.dumps({"pid": 1, "host": "another-host", "started": "x"}))
    with pytest.raises(RunLockedError, match="another-host"):  # another host's process: cannot be judged from here
        RunLock(run_dir).acquire()


# ---- 2. every loader names the file and the problem ----------------------------------------------
BINARY = bytes(range(256)) * 8


def _bad(tmp_path: Path, name: str, content: bytes = BINARY) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _loaders(tmp_path: Path):
    """(name, callable, expected message) for each loader fed a file of random bytes."""
    from headlab.analyses import retrieval, sinks
    from headlab.analyses.vision_heads import image_array, pope_dataset

    from headlab import HeadMask, HeadScores, InterventionPlan
    from headlab.datasets import read_records

    good_needles = tmp_path / "needles.jsonl"
    good_needles.write_text(json.dumps({"needle": "the code is 42 .", "question": "code?", "answer": "42"}) + "\n")
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return [
        ("jsonl", lambda: list(read_records(_bad(tmp_path, "d.jsonl"))), r"d\.jsonl, line 1: not UTF-8 text"),
        ("csv", lambda: list(read_records(_bad(tmp_path, "d.csv"))), r"d\.csv, line 1: not UTF-8 text"),
        ("texts", lambda: sinks.build_dataset(path=str(_bad(tmp_path, "t.txt"))), r"t\.txt, line 1: not UTF-8 text"),
        ("haystack", lambda: retrieval.build_dataset(good_needles, _bad(tmp_path, "h.txt")), r"h\.txt: not UTF-8 text"),
        ("pope", lambda: pope_dataset(_bad(tmp_path, "p.jsonl"), images), r"p\.jsonl, line 1: not UTF-8 text"),
        ("image", lambda: image_array(_bad(tmp_path, "i.png")), r"i\.png: not a PNG/JPEG image"),
        ("plan", lambda: InterventionPlan.load(_bad(tmp_path, "plan.json")), r"plan\.json: not UTF-8 text"),
        ("plan tensors", lambda: (_bad(tmp_path, "p2.json", b'{"format": "headlab.plan/1"}'),
                                  InterventionPlan.load(_bad(tmp_path, "p2.safetensors"))),
         r"p2\.safetensors: not a safetensors file"),
        ("mask json", lambda: HeadMask.load(_bad(tmp_path, "m.json")), r"m\.json: not UTF-8 text"),
        ("mask safetensors", lambda: HeadMask.load(_bad(tmp_path, "m.safetensors")), r"m\.safetensors: not a safetensors file"),
        ("scores", lambda: HeadScores.load(_bad(tmp_path, "s.safetensors")), r"s\.safetensors: not a safetensors file"),
        ("manifest", lambda: read_manifest(_bad(tmp_path / "run", "manifest.json") and tmp_path / "run"),
         r"manifest\.json: not UTF-8 text"),
    ]


@pytest.mark.parametrize("index", range(12))
def test_each_loader_names_the_file_and_the_problem(tmp_path, index):
    (tmp_path / "run").mkdir()
    name, load, message = _loaders(tmp_path)[index]
    with pytest.raises(InputFileError, match=message):
        load()


def test_more_bad_files(tmp_path):
    from headlab import HeadScores, InterventionPlan
    from headlab.datasets import read_records

    scores = HeadScores.from_tensor(__import__("torch").ones(2, 3), "x")
    path = scores.save(tmp_path / "ok.safetensors")
    truncated = _bad(tmp_path, "cut.safetensors", path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputFileError, match="cut.safetensors: not a safetensors file"):
        HeadScores.load(truncated)
    with pytest.raises(InputFileError, match="not valid JSON"):
        InterventionPlan.load(_bad(tmp_path, "p.json", b"{not json"))
    with pytest.raises(InputFileError, match="not a headlab plan"):
        InterventionPlan.load(_bad(tmp_path, "q.json", b"[1, 2]"))
    with pytest.raises(PlanError, match=r"r\.json: a head must be a \(layer, head\) pair of ints"):
        InterventionPlan.load(_bad(tmp_path, "r.json", b'{"format": "headlab.plan/1", "head_scales": [["a", 0, 1.0]]}'))
    with pytest.raises(InputFileError, match="not UTF-8 text .a NUL byte"):
        list(read_records(_bad(tmp_path, "n.jsonl", b'{"a": 1}\x00\n')))
    with pytest.raises(InputFileError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl"))
    with pytest.raises(InputFileError, match="not a file"):
        list(read_records(tmp_path))


def test_line_cap(tmp_path, monkeypatch):
    """A runaway line is refused while reading it, not after it filled memory."""
    from headlab import io
    from headlab.datasets import read_records

    path = _bad(tmp_path, "big.jsonl", b'{"a": 1}\n{"a": "' + b"x" * 5000 + b'"}\n')
    monkeypatch.setattr(io, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(io.iter_lines, "__defaults__", (1000,))
    with pytest.raises(InputFileError, match=r"big\.jsonl, line 2: longer than 1000 bytes"):
        list(read_records(path))


def test_cli_reports_an_undecodable_data_file(tmp_path):
    bad = _bad(tmp_path, "bin.jsonl")
    for command in (["score", "select-copy", "zoo:tasks-llama", "--data", str(bad)],
                    ["score", "sinks", "zoo:tasks-llama", "--data", str(_bad(tmp_path, "bin.txt"))],
                    ["intervene", "act", "zoo:tasks-llama", "--data", str(bad)]):
        result = runner.invoke(app, [*command, "--out", str(tmp_path / "runs")])
        assert result.exit_code == 2, result.output
        assert "not UTF-8 text" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_checkpoint_and_runstore_survive_garbage(tmp_path):
    from headlab.checkpoint import Checkpoint

    _bad(tmp_path, "progress.jsonl", BINARY + b'\n{"key": "0", "value": 1}\n')
    assert dict(Checkpoint(tmp_path / "progress.jsonl")) == {"0": 1}
    root = tmp_path / "runs"
    for name, content in (("a", BINARY), ("b", b"[1]"), ("c", b'{"format": "headlab.run/1", "id": "c"}')):
        _bad(root / name, "manifest.json", content) if (root / name).mkdir(parents=True) is None else None
    store = RunStore(root)
    listed = {m["id"]: m for m in store.list()}
    assert sorted(listed) == ["a", "b", "c"]  # bad runs are listed, flagged, never a crash
    assert listed["c"].get("problem") is None
    assert listed["a"]["status"] == listed["b"]["status"] == "unreadable"
    assert "not UTF-8 text" in listed["a"]["problem"] and "not an object" in listed["b"]["problem"]
    with pytest.raises(HeadlabError, match="not UTF-8 text"):
        store.manifest("a")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's owner-only 0600: a saved run is readable by whoever could read a plainly written file."""
    import stat

    from headlab.io import atomic_write_json

    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_json({"a": 1}, tmp_path / "x.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_an_automatic_id_held_by_another_process_gets_the_next_name(tmp_path, monkeypatch):
    """Two processes starting unnamed runs in the same second: the other one creates and locks the name
    after this one checked it was free; this one then takes the next name instead of failing."""
    import headlab.runs as runs
    from headlab import jobs

    candidate = Run(tmp_path, "sinks", "zoo:tasks-llama").id  # the name an automatic run picks now
    proc = _hold(tmp_path / candidate)
    seen = []
    real_exists = Path.exists

    def exists_after_the_check(self):  # the first check runs before the other process created it
        if self.name == candidate and not seen:
            seen.append(self)
            return False
        return real_exists(self)

    monkeypatch.setattr(runs.Path, "exists", exists_after_the_check)
    monkeypatch.setattr(runs, "datetime", type("Frozen", (), {"now": staticmethod(
        lambda tz=None: __import__("datetime").datetime.strptime(candidate[:15], "%Y%m%d-%H%M%S"))}))
    try:
        run = jobs.open_run(tmp_path, "sinks", "zoo:tasks-llama", {"n": 2}, None)
        assert seen and run.id == f"{candidate}-2" and run.lock.held
        run.release()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
