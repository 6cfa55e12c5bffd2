"""The `headlab` command line: info, demo, errors."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
from typer.testing import CliRunner

from headlab import HeadScores
from headlab.cli import app
from headlab.runs import RunStore, read_manifest

runner = CliRunner()


def test_info_prints_the_spec(tiny_dirs):
    result = runner.invoke(app, ["info", str(tiny_dirs("qwen2"))])
    assert result.exit_code == 0, result.output
    assert "Qwen2ForCausalLM" in result.output
    assert "layers         2" in result.output
    assert "1 kv heads (GQA x4)" in result.output
    assert "reference (exact PyTorch" in result.output


def test_info_on_a_missing_path(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_demo_writes_a_run(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "needle_mass:patched" in result.output and "run written to" in result.output
    store = RunStore(tmp_path / "runs")
    by_analysis = {m["analysis"]: m for m in store.list()}
    # the demo run, and one finished run of each head-scoring analysis that applies to the model
    assert set(by_analysis) == {"demo", "sinks", "retrieval", "patterns"}
    assert all(m["status"] == "finished" and store.scores(m["id"]) for m in by_analysis.values())
    assert {m["model"] for m in by_analysis.values()} == {"zoo:pycode-llama"}
    run_dir = store.run_dir(by_analysis["demo"]["id"])
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "finished" and manifest["analysis"] == "demo"
    answers = manifest["summary"]["answers"]
    assert answers["baseline"] == answers["expected"]  # the real-text model retrieves this needle
    assert answers["patched"] != answers["baseline"]  # pruning the card's retrieval heads breaks it
    scores = HeadScores.load(run_dir / "scores.safetensors")
    assert scores.shape == (6, 8) and scores.analysis == "needle_attention_mass"
    table = pd.read_parquet(run_dir / "samples.parquet")
    assert len(table) == 2 * 6 * 8
    patched = table[table.run == "patched"].set_index(["layer", "head"])
    base = table[table.run == "baseline"].set_index(["layer", "head"])
    # ZeroTuning gamma=1.5 on L2H4 raises its first-token mass; layer 0 sees unchanged inputs.
    assert patched.loc[(2, 4), "first_mass"] > base.loc[(2, 4), "first_mass"]
    assert patched.loc[(0, 4), "needle_mass"] == base.loc[(0, 4), "needle_mass"]
    assert patched.loc[(1, 7), "entropy"] == base.loc[(1, 7), "entropy"]  # below the plan's first layer: unchanged
    assert (run_dir / "figures" / "needle_attention_mass.html").is_file()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "headlab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout
