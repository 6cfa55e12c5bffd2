"""`headlab score ...` / `headlab intervene ...`: run directories, resume after interruption, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from headlab import HeadScores, InterventionPlan, jobs
from headlab.analyses import retrieval
from headlab.checkpoint import Checkpoint
from headlab.cli import app
from headlab.errors import HeadlabError
from headlab.runs import read_manifest

runner = CliRunner()


def test_checkpoint_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    c = Checkpoint(path)
    c["0"] = {"scores": [1.0, 2.0]}
    c["1"] = [3]
    with open(path, "a") as f:
        f.write('{"key": "2", "value": [4')  # killed mid-write
    again = Checkpoint(path)
    assert dict(again) == {"0": {"scores": [1.0, 2.0]}, "1": [3]}
    again["2"] = [5]  # recomputed after the torn line, read back fine
    assert Checkpoint(path)["2"] == [5]


def test_interrupted_retrieval_resumes_without_recomputing(tmp_path, monkeypatch):
    real = retrieval.sample_scores
    calls = []

    def failing(model, sample, config, plan=None):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(sample.prompt)
        return real(model, sample, config, plan)

    monkeypatch.setattr(retrieval, "sample_scores", failing)
    kw = dict(lengths=[64], depths=[0.0, 0.5, 1.0], progress=False)
    with pytest.raises(KeyboardInterrupt):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r1", **kw)
    assert read_manifest(tmp_path / "r1")["status"] == "interrupted"
    assert len(Checkpoint(tmp_path / "r1" / jobs.CHECKPOINT)) == 3

    def counting(model, sample, config, plan=None):
        calls.append(sample.prompt)
        return real(model, sample, config, plan)

    monkeypatch.setattr(retrieval, "sample_scores", counting)
    done = jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r1", **kw)
    assert len(calls) == 6  # 3 before the interruption + the 3 left (2 per cell x 3 depths)
    manifest = read_manifest(done)
    assert manifest["status"] == "finished" and manifest["resumed"] == 1
    fresh = jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r2", **kw)
    a, b = HeadScores.load(done / "scores.safetensors"), HeadScores.load(fresh / "scores.safetensors")
    assert a.values.tolist() == b.values.tolist()
    assert len(pd.read_parquet(done / "samples.parquet")) == 6
    with pytest.raises(HeadlabError, match="already finished"):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r1", **kw)


def test_resume_refuses_other_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "sample_scores", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r", lengths=[64], progress=False)
    with pytest.raises(HeadlabError, match="cannot resume run 'r': its params"):
        jobs.run("retrieval", "zoo:tasks-llama", tmp_path, "r", lengths=[128], progress=False)


def test_cli_select_copy_and_zerotuning_runs(tmp_path):
    r = runner.invoke(app, ["score", "select-copy", "zoo:mcqa-planted", "--out", str(tmp_path), "--n", "40", "--run-id", "sc"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "sc" / "summary.json").read_text())
    assert summary["best_head"] == [2, 1]
    assert (tmp_path / "sc" / "figures" / "qk_accuracy.html").is_file()
    assert len(pd.read_parquet(tmp_path / "sc" / "samples.parquet")) == 40
    r = runner.invoke(app, ["intervene", "zerotuning", "zoo:mcqa-planted", "--out", str(tmp_path), "--n", "24",
                            "--layers", "2", "--run-id", "zt"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "zt" / "summary.json").read_text())
    assert set(summary["test"]) >= {"accuracy_before", "accuracy_after"}
    InterventionPlan.load(tmp_path / "zt" / "plan")  # the calibrated plan reloads
    assert read_manifest(tmp_path / "zt")["files"]["plan"] == "plan.json"


def test_cli_user_dataset_errors_name_the_line(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n{"question": "q", "options": "a", "answer": 0}\n')
    r = runner.invoke(app, ["score", "select-copy", "zoo:mcqa-planted", "--out", str(tmp_path), "--data", str(bad)])
    assert r.exit_code == 2
    assert "mc.jsonl, line 2" in r.output and "at least 2 options" in r.output
    r = runner.invoke(app, ["score", "retrieval", "zoo:tasks-llama", "--out", str(tmp_path), "--needles", str(bad)])
    assert r.exit_code == 2 and "give both --needles" in r.output
    needles = tmp_path / "n.jsonl"
    needles.write_text('{"needle": "the code of k1 is v3 v4 .", "question": "q", "answer": "v9"}\n')
    hay = tmp_path / "h.txt"
    hay.write_text("the sky river tree")
    r = runner.invoke(app, ["score", "retrieval", "zoo:tasks-llama", "--out", str(tmp_path), "--needles", str(needles),
                            "--haystack", str(hay)])
    assert r.exit_code == 2 and "line 1: 'answer' 'v9' does not occur in 'needle'" in r.output
    r = runner.invoke(app, ["score", "sinks", "some/local/model", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "give --data" in r.output
