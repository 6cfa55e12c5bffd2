"""HeadScores, HeadMask and InterventionPlan: values, merging, exports, atomic save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import headlab
from headlab import HeadMask, HeadScores, InterventionPlan
from headlab.errors import HeadlabError


def scores(values, analysis="retrieval", counts=1.0, **kw):
    return HeadScores.from_tensor(torch.tensor(values, dtype=torch.float64), analysis, counts=counts, model="m", **kw)


def test_top_ranks_and_masks():
    s = scores([[0.1, 0.9, 0.0], [0.5, float("nan"), 0.3]])
    assert s.top(3) == [(0, 1, 0.9), (1, 0, 0.5), (1, 2, pytest.approx(0.3))]
    assert s.ranks().tolist() == [[3, 0, 4], [1, 5, 2]]
    assert set(s.to_mask(threshold=0.2).heads) == {(0, 1), (1, 0), (1, 2)}
    assert set(s.to_mask(top_k=2).heads) == {(0, 1), (1, 0)}
    with pytest.raises(HeadlabError, match="exactly one"):
        s.to_mask(threshold=0.1, top_k=1)


def test_merge_is_exact_over_sums_and_counts():
    a = HeadScores(sums=torch.tensor([[1.0, 2.0]], dtype=torch.float64), counts=torch.tensor([[2.0, 1.0]], dtype=torch.float64), analysis="x")
    b = HeadScores(sums=torch.tensor([[3.0, 0.0]], dtype=torch.float64), counts=torch.tensor([[2.0, 3.0]], dtype=torch.float64), analysis="x")
    merged = a + b
    assert merged.values.tolist() == [[1.0, 0.5]]
    with pytest.raises(HeadlabError, match="different analysis"):
        a.merge(HeadScores(sums=a.sums, counts=a.counts, analysis="y"))


def test_save_load_roundtrip_and_no_temp_files(tmp_path):
    s = scores([[0.25, 0.5], [0.75, 1.0]], params={"depths": 10}, metadata={"dataset": "abc123"})
    path = s.save(tmp_path / "scores")
    loaded = HeadScores.load(path)
    assert torch.equal(loaded.values, s.values) and loaded.params == {"depths": 10}
    assert loaded.metadata == {"dataset": "abc123"} and loaded.analysis == "retrieval"
    readable = json.loads((tmp_path / "scores.json").read_text())
    assert readable["values"] == [[0.25, 0.5], [0.75, 1.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "scores.safetensors"]
    with pytest.raises(HeadlabError, match="no such file"):
        HeadScores.load(tmp_path / "missing")


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    s = scores([[1.0]])
    path = s.save(tmp_path / "scores")
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        scores([[2.0]]).save(tmp_path / "scores")
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_frame_plot_and_html():
    s = scores([[0.1, 0.9], [0.5, 0.3]])
    frame = s.to_frame()
    assert list(frame.columns) == ["layer", "head", "score", "count", "rank"]
    assert frame.loc[frame["rank"] == 0, ["layer", "head"]].values.tolist() == [[0, 1]]
    fig = s.plot()
    assert fig.data[0].type == "heatmap" and fig.data[0].z[0][1] == pytest.approx(0.9)
    assert "L0" not in s._repr_html_() and "<table>" in s._repr_html_()


def test_mask_exports(tmp_path):
    mask = HeadMask(heads={(0, 1): 0.9, (1, 3): 0.4}, n_layers=2, n_heads=4, source={"analysis": "retrieval"})
    assert HeadMask.load(mask.save_json(tmp_path / "m.json")) == mask
    st = mask.save_safetensors(tmp_path / "m.safetensors")
    tensors = load_file(str(st))
    assert tensors["mask"].tolist() == [[False, True, False, False], [False, False, False, True]]
    assert HeadMask.load(st).heads == pytest.approx(mask.heads)
    duo = mask.save_duo_attention(tmp_path / "full_attention_heads.tsv")
    assert duo.read_text() == "0\t1\t0\t0\n0\t0\t0\t1\n"
    kv = mask.save_duo_attention(tmp_path / "kv.tsv", n_kv_heads=2)
    assert kv.read_text() == "1\t0\n0\t1\n"
    with pytest.raises(HeadlabError, match="outside"):
        HeadMask(heads={(2, 0): 1.0}, n_layers=2, n_heads=4)


def test_mask_to_plan():
    mask = HeadMask.from_heads([(0, 1), (1, 2)], 2, 4)
    assert mask.to_plan("prune").head_scales == {(0, 1): 0.0, (1, 2): 0.0}
    assert mask.to_plan("scale", 2.0).head_scales == {(0, 1): 2.0, (1, 2): 2.0}
    assert mask.jaccard(HeadMask.from_heads([(1, 2)], 2, 4)) == 0.5


def test_plan_composition_and_compile():
    plan = (InterventionPlan().scale_heads({(0, 1): 2.0}).scale_heads({(0, 1): 1.5})
            .scale_first_token({(0, 2): math.e}).key_bias({(0, 2): 1.0}, [0, 3]).act([(0, 3)], beta=0.5))
    layer = plan.compile_layer(0, n_heads=4, head_dim=8)
    assert layer.head_scale.tolist() == [1.0, 3.0, 1.0, 1.0]
    assert layer.bias_positions.tolist() == [0, 3]
    assert layer.bias[2].tolist() == pytest.approx([2.0, 1.0])  # log e + 1 on key 0, 1 on key 3
    assert layer.act_heads.tolist() == [False, False, False, True] and layer.act_beta[3] == 0.5
    assert plan.compile_layer(1, 4, 8) is None
    assert plan.layers() == {0}
    both = plan + InterventionPlan().prune_heads([(1, 0)])
    assert both.heads() == {(0, 1), (0, 2), (0, 3), (1, 0)}


def test_logit_scales_compose_compile_and_roundtrip():
    plan = InterventionPlan().uniform_attention([(1, 2)], 1e-4).scale_logits({(1, 2): 10.0, (0, 0): 0.5})
    assert plan.logit_scales == {(1, 2): pytest.approx(1e-3), (0, 0): 0.5}
    layer = plan.compile_layer(1, n_heads=4, head_dim=8)
    assert layer.logit_scale.tolist() == pytest.approx([1.0, 1.0, 1e-3, 1.0])
    assert layer.touches_probabilities and not plan.compile_layer(0, 4, 8).has_bias
    assert InterventionPlan.from_dict(plan.to_dict()) == plan
    assert (plan + InterventionPlan().scale_logits({(1, 2): 2.0})).logit_scales[(1, 2)] == pytest.approx(2e-3)
    with pytest.raises(headlab.PlanError, match="logit scale"):
        InterventionPlan().scale_logits({(0, 0): -1.0})


def test_plan_save_load_with_tensors(tmp_path):
    plan = (InterventionPlan().prune_heads([(0, 0)]).act([(1, 1)], beta=0.3, tau=0.2)
            .ablate_heads([(1, 2)], "mean", means={(1, 2): torch.arange(4.0)})
            .patch_heads({(0, 3): torch.ones(2, 5, 4)}))
    path = plan.save(tmp_path / "plan")
    loaded = InterventionPlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert torch.equal(loaded.means[(1, 2)], torch.arange(4.0))
    assert torch.equal(loaded.patches[(0, 3)], torch.ones(2, 5, 4))
    (tmp_path / "plan.safetensors").unlink()
    with pytest.raises(headlab.PlanError, match="needs tensors"):
        InterventionPlan.load(path)


def test_runs_directory(tmp_path):
    from headlab.runs import Run, list_runs, read_manifest

    with Run(tmp_path, analysis="demo", model="tiny", params={"a": 1}, seed=3) as run:
        assert read_manifest(run.dir)["status"] == "running"
        run.save_scores(scores([[1.0]]))
    manifest = read_manifest(run.dir)
    assert manifest["status"] == "finished" and manifest["files"]["scores"] == "scores.safetensors"
    assert {"torch", "transformers", "headlab"} <= set(manifest["versions"])
    with pytest.raises(ValueError):
        with Run(tmp_path, analysis="boom", model="tiny", run_id="failing"):
            raise ValueError("bad")
    failed = read_manifest(tmp_path / "failing")
    assert failed["status"] == "failed" and "bad" in failed["error"]
    assert {m["id"] for m in list_runs(tmp_path)} == {run.id, "failing"}
