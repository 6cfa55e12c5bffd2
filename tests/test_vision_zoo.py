"""The toy VLM `zoo:shapes-llava`: it loads with its processor, answers from the image, its
vision-aware heads (VHD) are the heads whose ablation hurts image-dependent answers (its card), and
VHR with α > 1 raises accuracy where the text prior conflicts with the image (α = 1: identity).
Also the POPE-format file path, the jobs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from headlab import HeadlabError, load_model, zoo
from headlab.analyses import vision_heads as vh
from headlab.datasets import DatasetError
from headlab.headview import head_view
from headlab.zoo import shapes

MODEL = "zoo:shapes-llava"
VHR_ALPHA = 2.0  # measured: conflict accuracy 0.58 -> 0.75 on these 24 prompts (k = 2)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads((zoo.path("shapes-llava") / "card.json").read_text())


@pytest.fixture(scope="module")
def vhd(model):
    samples = [vh.to_sample(model, q) for q in vh.zoo_questions(("color", "shape", "where"), 8)]
    return vh.score(model, samples, max_new_tokens=2, progress=False)[0]


def test_loads_with_its_processor_and_reads_the_image(model, card):
    assert model.spec.modality == "vision-language" and model.spec.shape == (4, 8)
    assert hasattr(model.tokenizer, "image_processor")
    assert card["accuracy"]["color"] >= 0.95 and card["accuracy_blank_image"]["color"] <= 0.5
    result = vh.evaluate(model, vh.zoo_questions(("color", "where"), 16))
    assert result["accuracy"] >= 0.9


def test_vhd_finds_the_heads_whose_ablation_hurts_image_answers(vhd, card):
    # the card's ground truth: the heads whose pruning lowers the answer's log-probability on
    # image-dependent questions (three clear ones; single pruning of any other head changes < 0.001)
    critical = {(r["layer"], r["head"]) for r in card["ablation"] if r["logprob_drop"] > 0.01}
    assert len(critical) == 3
    top_vhd = {(l, h) for l, h, _ in vhd.top(8)}
    assert critical <= top_vhd  # chance of all three in a random top-8 of 32 heads: ~1%
    values = vhd.values
    others = [float(values[l, h]) for l in range(4) for h in range(8) if (l, h) not in critical]
    assert min(float(values[l, h]) for l, h in critical) > sorted(others)[len(others) // 2]  # above the median


def test_vhr_raises_accuracy_where_the_prior_conflicts(model):
    conflict = vh.zoo_questions(("object",), 24, seed=71_000, conflict=True)
    before = vh.evaluate(model, conflict)
    same = vh.evaluate(model, conflict, alpha=1.0, k=2)
    assert [r["generated"] for r in same["rows"]] == [r["generated"] for r in before["rows"]]
    after = vh.evaluate(model, conflict, alpha=VHR_ALPHA, k=2)
    assert after["conflict_accuracy"] > before["conflict_accuracy"] + 0.1


def test_head_view_marks_the_image_span(model):
    q = vh.zoo_questions(("color",), 1)[0]
    view = head_view(model, q.prompt, 3, 0, image=q.image)
    assert view.spans["image"] == (1, 17) and view.tokens[1:17] == ["<image>"] * 16 and view.tokens[0] == "<bos>"
    assert float(view.row.sum()) == pytest.approx(1.0, abs=1e-4)


def _pope_files(tmp_path, bad_label=False):
    rng = __import__("random").Random(5)
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        ex = shapes.example(rng, "pope")
        Image.fromarray(ex.scene.array(rng)).save(images / f"{i}.png")
        question = ex.prompt.split("question : ")[1].split(" answer")[0]
        rows.append({"question_id": i, "image": f"{i}.png", "text": question, "label": ex.answer})
    if bad_label:
        rows[3]["label"] = "maybe"
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images


def test_pope_file_metrics_and_errors(model, tmp_path):
    data, images = _pope_files(tmp_path)
    questions = vh.pope_dataset(data, images, template="<image> question : {question} answer :")
    result = vh.evaluate(model, questions)
    pope = result["pope"]
    assert set(pope) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "hallucination_rate"}
    assert pope["accuracy"] >= 5 / 6
    (tmp_path / "b").mkdir()
    bad, bad_images = _pope_files(tmp_path / "b", bad_label=True)
    with pytest.raises(DatasetError, match="line 4: label must be 'yes' or 'no'"):
        vh.pope_dataset(bad, bad_images)
    with pytest.raises(HeadlabError, match="image folder .* does not exist"):
        vh.pope_dataset(data, tmp_path / "nope")
    no_placeholder = vh.ImageQuestion("question : is the shape red ? answer :", np.zeros((32, 32, 3), np.uint8), "no")
    with pytest.raises(HeadlabError, match="processor rejected|no image tokens"):
        vh.to_sample(model, no_placeholder)


def test_jobs_and_cli(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import app
    from headlab.runs import RunStore

    runner = CliRunner()
    r = runner.invoke(app, ["score", "vision-heads", MODEL, "--out", str(tmp_path), "--n", "2", "--max-new-tokens", "1",
                            "--run-id", "vhd"])
    assert r.exit_code == 0, r.output
    store = RunStore(tmp_path)
    assert store.scores("vhd")["vhd"].shape == (4, 8)
    examples = store.examples("vhd")
    assert len(examples) == 6 and store.example_image("vhd", examples[0]).size == (32, 32)
    r = runner.invoke(app, ["intervene", "vhr", MODEL, "--out", str(tmp_path), "--n", "4", "--run-id", "vhr"])
    assert r.exit_code == 0, r.output
    summary = store.summary("vhr")
    assert {"accuracy", "pope", "conflict_accuracy"} <= set(summary["before"]) and "after" in summary
    keys = {json.loads(line)["key"].split(":")[0] for line in (tmp_path / "vhr" / "progress.jsonl").read_text().splitlines()}
    assert keys == {"before", "after", "random0"}  # every answer (and the control's) checkpointed: a run resumes
    r = runner.invoke(app, ["intervene", "var", MODEL, "--out", str(tmp_path), "--n", "1", "--run-id", "var"])
    assert r.exit_code == 0, r.output
    summary = store.summary("var")
    # the toy VLM has no massive activations: VAR says it changed nothing, and the answers agree
    assert summary["questions_with_visual_sinks"] == 0 and "changed nothing" in summary["note"]
    assert summary["before"]["accuracy"] == summary["after"]["accuracy"]
    r = runner.invoke(app, ["score", "vision-heads", "zoo:tasks-llama", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--data" in r.output


def test_training_script_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vlm"
    subprocess.run([sys.executable, str(root / "studies/zoo/train_vlm.py"), "--out", str(out), "--steps", "2", "--batch", "4",
                    "--eval-every", "2", "--eval-n", "2"], check=True, capture_output=True)
    trained = load_model(out)
    assert trained.spec.modality == "vision-language" and hasattr(trained.tokenizer, "image_processor")
    record = json.loads((out / "training.json").read_text())
    assert len(record["loss"]) == 1 and record["eval"][0]["step"] == 2
