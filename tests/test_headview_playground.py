"""head_view and compare_plan (what the app's head detail and playground call), checked against
an independent eager forward; mask → plan kinds and exports; the app's task manager."""

from __future__ import annotations

import random
import time

import pytest
import torch

from headlab import HeadlabError, HeadMask, InterventionPlan, load_model
from headlab.headview import head_view
from headlab.playground import Cancelled, compare_plan
from headlab.zoo import tasks

MODEL = "zoo:tasks-llama"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def eager():
    return load_model(MODEL, attn_implementation="eager")


@pytest.fixture(scope="module")
def prompt() -> str:
    return tasks.needle(random.Random(3), length=(40, 60)).prompt


@pytest.mark.parametrize("layer, head, query", [(0, 0, -1), (2, 5, -1), (3, 7, 10), (1, 3, 0)])
def test_head_view_equals_eager_attention(model, eager, prompt, layer, head, query):
    view = head_view(model, prompt, layer, head, query=query, spans={"first": (0, 1), "bad": (5, 10_000)})
    ids = model.tokenize(prompt)["input_ids"]
    attn = eager(ids, output_attentions=True).attentions[layer][0, head].float()  # [Q, K], the eager matrix
    n = ids.shape[1]
    assert view.tokens == model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert view.query_position == query % n
    torch.testing.assert_close(view.row, attn[query % n], atol=1e-5, rtol=1e-4)
    seen_by = torch.arange(n, 0, -1, dtype=torch.float32)  # key j is seen by queries j..n-1
    torch.testing.assert_close(view.received_mean, attn.sum(0) / seen_by, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(view.argmax_prob, attn.max(-1).values, atol=1e-5, rtol=1e-4)
    assert torch.equal(view.argmax, attn.argmax(-1))
    ent = -(attn * attn.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(view.entropy, ent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(view.span_mass["first"], attn[:, 0], atol=1e-5, rtol=1e-4)
    assert "bad" not in view.span_mass  # a span beyond the input is dropped, not an error
    top = view.top(3)
    assert [p for p, _, _ in top] == attn[query % n].topk(3).indices.tolist()
    frame = view.to_frame()
    assert len(frame) == n and list(frame.columns)[:3] == ["position", "token", "attention"]
    # every head of the layer from the chosen query, and this head among the window's tokens
    layer_attn = eager(ids, output_attentions=True).attentions[layer][0].float()  # [H, Q, K]
    torch.testing.assert_close(view.layer_rows, layer_attn[:, query % n], atol=1e-5, rtol=1e-4)
    q, w0 = query % n, view.window_start
    assert w0 == max(0, q - 47) and view.window_matrix.shape == (q - w0 + 1, q - w0 + 1)
    torch.testing.assert_close(view.window_matrix, attn[w0:q + 1, w0:q + 1], atol=1e-5, rtol=1e-4)


def test_head_view_under_a_plan(model, prompt):
    # ZeroTuning γ on key 0 changes exactly what the formula says: A0 <- γA0 / (1 + (γ-1)A0)
    base = head_view(model, prompt, 1, 2)
    gamma = 3.0
    scaled = head_view(model, prompt, 1, 2, plan=InterventionPlan().scale_first_token({(1, 2): gamma}))
    a0 = base.row[0]
    assert float(scaled.row[0]) == pytest.approx(float(gamma * a0 / (1 + (gamma - 1) * a0)), rel=1e-4)


@pytest.mark.parametrize("kw, message", [
    ({"text": "  "}, "input text is empty"),
    ({"query": 999}, "query position 999 is outside"),
    ({"layer": 9}, "layer 9 does not exist"),
    ({"max_tokens": 4}, "more than max_tokens=4"),
])
def test_head_view_bad_input(model, prompt, kw, message):
    args = {"text": prompt, "layer": 0, "head": 0, **kw}
    with pytest.raises(HeadlabError, match=message):
        head_view(model, **args)


def test_compare_plan_identity_and_prune(model, prompt):
    same = compare_plan(model, prompt, InterventionPlan(), max_new_tokens=3)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.baseline_text == same.patched_text
    assert all(abs(c["delta"]) < 1e-6 for c in same.changes)

    plan = InterventionPlan().prune_heads([(0, 0), (0, 1)])
    seen: list[float] = []
    result = compare_plan(model, prompt, plan, max_new_tokens=3, top_k=5, progress=lambda f, m: seen.append(f))
    ids = model.tokenize(prompt)["input_ids"]
    with model.patched(None):
        p = model(ids).logits[0, -1].float().log_softmax(-1)
    with model.patched(plan):
        q = model(ids).logits[0, -1].float().log_softmax(-1)
    assert result.kl == pytest.approx(float((q.exp() * (q - p)).sum()), rel=1e-5)
    assert [t for t, _ in result.baseline_top] == [model.tokenizer.decode([i]) for i in p.topk(5).indices.tolist()]
    assert result.changes == sorted(result.changes, key=lambda c: -abs(c["delta"]))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 2 + 2 * 3
    assert result.to_dict()["plan"] == plan.for_model(model.spec).to_dict()


def test_compare_plan_stops_and_rejects(model, prompt):
    with pytest.raises(Cancelled):
        compare_plan(model, prompt, InterventionPlan(), max_new_tokens=8, should_stop=lambda: True)
    with pytest.raises(HeadlabError, match="prompt is empty"):
        compare_plan(model, " ", InterventionPlan())
    with pytest.raises(HeadlabError, match="head .* layer 7 does not exist|layer 7"):
        compare_plan(model, prompt, InterventionPlan().prune_heads([(7, 0)]))


def test_mask_plan_kinds_and_exports(tmp_path):
    mask = HeadMask.from_heads([(0, 1), (2, 3)], 4, 8)
    assert mask.to_plan("prune").to_dict() == InterventionPlan().prune_heads([(0, 1), (2, 3)]).to_dict()
    assert mask.to_plan("scale", 2.0).to_dict() == InterventionPlan().scale_heads({(0, 1): 2.0, (2, 3): 2.0}).to_dict()
    assert mask.to_plan("first_token", 1.5).to_dict() == InterventionPlan().scale_first_token({(0, 1): 1.5, (2, 3): 1.5}).to_dict()
    assert mask.to_plan("act", 0.3).to_dict() == InterventionPlan().act([(0, 1), (2, 3)], beta=0.3).to_dict()
    with pytest.raises(HeadlabError, match="unknown plan kind 'bogus'"):
        mask.to_plan("bogus")
    for fmt, suffix in mask.EXPORT_FORMATS.items():
        path = mask.export(tmp_path / f"m{suffix}", fmt)
        if fmt != "duo_attention":
            assert set(HeadMask.load(path).heads) == set(mask.heads)
    with pytest.raises(HeadlabError, match="unknown mask format"):
        mask.export(tmp_path / "m.x", "xml")


def test_task_manager_progress_errors_and_cancel():
    pytest.importorskip("dash")
    from headlab.app.tasks import TaskManager

    tm = TaskManager(workers=2)

    def wait(task_id):
        for _ in range(200):
            t = tm.get(task_id)
            if t.state not in ("queued", "running"):
                return t
            time.sleep(0.01)
        raise AssertionError("task did not finish")

    def ok(progress, should_stop):
        progress(0.5, "half")
        return {"answer": 42}

    t = wait(tm.submit("ok", ok))
    assert (t.state, t.result, t.progress) == ("done", {"answer": 42}, 1.0)
    t = wait(tm.submit("bad", lambda p, s: (_ for _ in ()).throw(HeadlabError("layer 9 does not exist"))))
    assert (t.state, t.error) == ("error", "layer 9 does not exist")
    t = wait(tm.submit("crash", lambda p, s: 1 / 0))
    assert t.state == "error" and t.error.startswith("internal error (ZeroDivisionError") and "Traceback" not in t.error

    started = []

    def slow(progress, should_stop):
        started.append(1)
        while not should_stop():
            time.sleep(0.01)
        raise Cancelled("stopped")

    task_id = tm.submit("slow", slow)
    while not started:
        time.sleep(0.01)
    tm.cancel(task_id)
    assert wait(task_id).state == "cancelled"
    with pytest.raises(HeadlabError, match="expired"):
        tm.get("nope")
    tm.shutdown()
