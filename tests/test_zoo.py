"""The zoo: synthetic tasks, the shipped trained model, its card, and the training script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import headlab
from headlab import zoo
from headlab.zoo import tasks
from headlab.zoo.evaluate import accuracy, encode, mean_head_outputs

ROOT = Path(__file__).resolve().parents[1]
CARD = json.loads((zoo.path("tasks-llama") / "card.json").read_text())
FRESH_SEED = 30_000  # neither training (< 10_000), training eval (10_000) nor the card (20_000)


@pytest.fixture(scope="module")
def model():
    return headlab.load_model("zoo:tasks-llama")


def test_tasks_are_seeded_and_well_formed():
    assert [e.prompt for e in tasks.held_out("needle", 5)] == [e.prompt for e in tasks.held_out("needle", 5)]
    assert tasks.held_out("mcqa", 5)[0] != tasks.held_out("mcqa", 5, seed=1)[0]
    for ex in tasks.held_out("needle", 20):
        key = ex.meta["key"]
        words = ex.prompt.split()
        at = words.index("code")
        assert words[at + 2] == key and " ".join(words[at + 4 : at + 6]) == ex.answer
    for ex in tasks.held_out("mcqa", 20):
        words = ex.prompt.split()
        label_at = words.index(ex.answer, 7)
        target = words[5]
        assert words[label_at + 1] == ")" and words[label_at + 2] in tasks.CATEGORIES[target]
    table = tasks.facts()
    for ex in tasks.held_out("conflict", 30):
        expected = ex.meta["context"] if ex.meta["mode"] == "report" else table[ex.prompt.split()[-5]]
        assert ex.answer == expected
    for ex in tasks.held_out("refusal", 30):
        harmful = any(w in tasks.HARMFUL for w in ex.prompt.split())
        assert harmful == ex.meta["harmful"] and (ex.answer == "sorry i cannot help") == harmful
    vocab = tasks.vocabulary()
    assert len(vocab) == len(set(vocab)) and vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]


def test_shipped_model_loads_offline_as_plain_hf_directory():
    path = zoo.path("tasks-llama")
    assert "tasks-llama" in zoo.available()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.tokenize("the code of k3 is v1 v2 .") == ["the", "code", "of", "k3", "is", "v1", "v2", "."]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert hf.config.num_attention_heads == 8 and hf.config.num_key_value_heads == 2
    assert sum(f.stat().st_size for f in path.iterdir()) < 4 * 2**20  # a few MB


@pytest.mark.parametrize("task", tasks.TASKS)
def test_recorded_accuracy_on_a_fresh_held_out_sample(model, task):
    examples = tasks.held_out(task, 60, seed=FRESH_SEED)
    got = accuracy(model, examples)
    recorded = CARD["tasks"][task]["accuracy"]
    assert recorded >= 0.9
    assert got >= recorded - 0.1, (task, got, recorded)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_card_ablation_heads_reproduce(model, task):
    card = CARD["tasks"][task]
    examples = tasks.held_out(task, 80, seed=card["seed"])
    base = accuracy(model, examples)
    top = card["top_heads"][0]
    head = (top["layer"], top["head"])
    means = mean_head_outputs(model, examples)
    mode = "mean" if top["mean_drop"] >= top["zero_drop"] else "zero"
    drop = base - accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads([head], mode, means=means))
    assert drop >= 0.5 * top[f"{mode}_drop"] > 0, (task, head, mode, drop, top)
    joint = [tuple(h) for h in card["joint_top_k"]["heads"]]
    joint_drop = base - accuracy(model, examples, plan=headlab.InterventionPlan().ablate_heads(joint, "mean", means=means))
    assert joint_drop >= 0.5 * card["joint_top_k"]["mean_ablation_drop"], (task, joint_drop)
    assert card["joint_top_k"]["mean_ablation_drop"] > card["random_k"]["mean_drop"] + 0.3


def train_few_steps(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "studies/zoo/train.py"), "--out", str(out), "--steps", "3", "--batch", "4",
                    "--eval-every", "3", "--eval-n", "4", "--haystack", "16", "32", "--device", "cpu"],
                   check=True, capture_output=True, cwd=out.parent)


def test_training_script_runs_a_few_steps_reproducibly(tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    train_few_steps(first)
    train_few_steps(second)
    log = json.loads((first / "training.json").read_text())
    assert [e["step"] for e in log["eval"]] == [3] and set(tasks.TASKS) <= set(log["eval"][0])
    assert log["loss"] and log["args"]["seed"] == 0
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded: bit-identical on CPU
    small = headlab.load_model(first)
    batch = encode(small.tokenizer, tasks.held_out("refusal", 2))
    assert batch["labels"].ne(-100).sum() > 0


@pytest.mark.parametrize("task", tasks.TASKS)
def test_card_shows_sparse_head_structure(task):
    """Acceptance of the zoo: ≤ 10% of heads carry most of each task's single-head ablation damage."""
    card = CARD["tasks"][task]
    k = card["joint_top_k"]["k"]
    assert k <= 0.1 * len(card["all_heads"])
    for mode in ("zero_drop", "mean_drop"):
        drops = sorted((max(0.0, r[mode]) for r in card["all_heads"]), reverse=True)
        assert sum(drops) > 0.1
        assert sum(drops[:k]) / sum(drops) >= 0.8, (task, mode)
    assert card["joint_top_k"]["mean_ablation_drop"] >= 0.4
    assert card["random_k"]["mean_drop"] <= 0.05
