"""RunStore: the read side of run directories — listing, loading, and refusing to leave the root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from headlab import HeadlabError, HeadScores, InterventionPlan
from headlab.runs import Run, RunStore


def _run(root, analysis="retrieval", run_id=None, **kw):
    scores = HeadScores.from_tensor(torch.arange(8.0).view(2, 4), analysis, model="m")
    with Run(root, analysis, "m", params={"data": "needles.jsonl", "n": 3}, run_id=run_id) as run:
        run.save_scores(scores)
        run.save_plan(InterventionPlan().prune_heads([(0, 1)]))
        if kw.get("per_sample"):
            run.save_per_sample({"scores": torch.rand(5, 2, 4)}, [f"s{i}" for i in range(5)])
            run.save_examples([{"text": "a b c", "label": "first", "spans": {"needle": (1, 2)}}])
    return run


def test_lists_and_loads(tmp_path):
    a = _run(tmp_path, run_id="a-run", per_sample=True)
    _run(tmp_path, analysis="sinks", run_id="b-run")
    store = RunStore(tmp_path)
    assert set(store.ids()) == {"a-run", "b-run"}
    row = next(r for r in store.table() if r["id"] == "a-run")
    assert (row["analysis"], row["dataset"], row["status"], row["scores"]) == ("retrieval", "needles.jsonl", "finished", "scores")
    assert json.loads(row["params"]) == {"n": 3}
    scores = store.scores("a-run")  # the plan's safetensors is not mistaken for scores
    assert list(scores) == ["scores"] and torch.equal(scores["scores"].values, torch.arange(8.0, dtype=torch.float64).view(2, 4))
    per, names = store.per_sample("a-run")
    assert per["scores"].shape == (5, 2, 4) and names == [f"s{i}" for i in range(5)]
    assert store.examples("a-run") == [{"text": "a b c", "label": "first", "spans": {"needle": [1, 2]}}]
    assert store.per_sample("b-run") == ({}, []) and store.examples("b-run") == []
    with pytest.raises(HeadlabError, match="no scores named 'nope'"):
        store.score("a-run", "nope")
    assert a.dir.resolve() == store.run_dir("a-run")


@pytest.mark.parametrize("bad", ["..", "../etc", "/etc/passwd", "a/b", "", ".hidden", "x" * 300, None])
def test_refuses_ids_that_are_not_plain_names(tmp_path, bad):
    _run(tmp_path, run_id="ok")
    with pytest.raises(HeadlabError, match="invalid run id"):
        RunStore(tmp_path).run_dir(bad)


def test_refuses_symlinks_and_manifest_paths_leading_out(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    _run(outside, run_id="secret")
    (outside / "secret" / "note.txt").write_text("private")
    root.mkdir()
    (root / "link").symlink_to(outside / "secret")
    _run(root, run_id="crafted")
    manifest = root / "crafted" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["summary"] = "../../outside/secret/note.txt"
    manifest.write_text(json.dumps(m))
    store = RunStore(root)
    with pytest.raises(HeadlabError, match="leads outside"):
        store.run_dir("link")
    assert store.ids() == ["crafted"]  # the symlinked run is not listed either
    with pytest.raises(HeadlabError, match="outside its directory"):
        store.summary("crafted")


def test_missing_root_and_run(tmp_path):
    with pytest.raises(HeadlabError, match="does not exist.*headlab demo"):
        RunStore(tmp_path / "missing")
    with pytest.raises(HeadlabError, match="no run 'ghost'"):
        RunStore(tmp_path).run_dir("ghost")


def test_a_killed_run_reads_as_interrupted(tmp_path):
    # a child process opens a run and dies without finishing it (as a SIGKILL would leave it)
    code = ("import os, sys; from headlab.runs import Run; r = Run(sys.argv[1], 'x', 'm', run_id='killed'); "
            "r.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    on_disk = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert on_disk["status"] == "running" and on_disk["pid"] != os.getpid()
    m = RunStore(tmp_path).manifest("killed")
    assert m["status"] == "interrupted" and "ended" in m["status_note"]
    # a running run of a live process (this one) stays "running"
    run = Run(tmp_path, "y", "m", run_id="live").__enter__()
    assert RunStore(tmp_path).manifest("live")["status"] == "running"
    run.__exit__(None, None, None)
    assert RunStore(tmp_path).manifest("live")["status"] == "finished"


def test_per_sample_shape_is_checked(tmp_path):
    with Run(tmp_path, "x", "m") as run:
        with pytest.raises(HeadlabError, match=r"\[n_samples, n_layers, n_heads\]"):
            run.save_per_sample({"s": torch.rand(2, 3)})
        with pytest.raises(HeadlabError, match="needs a 'text'"):
            run.save_examples([{"label": "no text"}])
