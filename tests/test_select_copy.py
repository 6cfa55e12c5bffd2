"""Select-and-copy heads: prompt rendering, key tokens, and the planted head of zoo:mcqa-planted."""

from __future__ import annotations

import json

import pytest
from headlab.analyses import select_copy as sc

import headlab
from headlab import zoo
from headlab.errors import HeadlabError
from headlab.zoo import tasks


@pytest.fixture(scope="module")
def model():
    return headlab.load_model("zoo:mcqa-planted")


@pytest.fixture(scope="module")
def result(model):
    config = sc.SelectCopyConfig(labels="letters", format=sc.ZOO_FORMAT)
    return sc.score(model, sc.zoo_dataset(120, label_set="letters"), config, progress=False)


def test_zoo_format_renders_the_training_prompt():
    rng = __import__("random").Random(5)
    ex = tasks.mcqa(rng, "digits")
    sample = sc.MCQASample(ex.prompt.split(" : ", 1)[1].split(" ?")[0] + " ?", tuple(ex.meta["options"]), ex.meta["correct"])
    assert sc.render(sample, sc.LABEL_SETS["digits"], sc.ZOO_FORMAT).text == ex.prompt


@pytest.mark.parametrize("fmt", [sc.ZOO_FORMAT, sc.PAPER_FORMAT])
def test_key_tokens_are_each_options_label_and_last_token(model, fmt):
    sample = sc.MCQASample("which is a fruit ?", ("saw", "lemon", "plane", "mouse"), 1)
    shots = [sc.MCQASample("which is a color ?", ("tin", "purple", "rabbit", "train"), 1)]
    prompt = sc.render(sample, "ABCD", fmt, shots)
    ids, ends = sc.key_positions(model, prompt, "end")
    _, labels = sc.key_positions(model, prompt, "label")
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    # the word tokenizer drops "\n": the paper format's end-of-line falls back to the option's last word
    assert [tokens[p] for p in ends] == list(sample.options)
    if fmt is sc.ZOO_FORMAT:  # the word tokenizer reads "A." as one unknown word: check labels by token there only
        assert [tokens[p] for p in labels] == list("ABCD")
    assert all(labels[i] < ends[i] < labels[i + 1] for i in range(3)) and labels[3] < ends[3]
    assert min(labels) > tokens.index("fruit")  # the scored options are the last question's, not the shot's
    assert prompt.text.count("Answer:" if fmt is sc.PAPER_FORMAT else "answer :") == 2


def test_the_planted_head_is_found_and_beats_or_matches_the_letter_baseline(result):
    card = json.loads((zoo.path("mcqa-planted") / "card.json").read_text())
    planted = [int(x) for x in card["training"]["args"]["plant"][1:]]
    critical = [[r["layer"], r["head"]] for r in card["tasks"]["mcqa"]["top_heads"][:3]]
    assert result.test["best_head"] == planted
    assert result.test["best_head"] in critical
    assert result.test["qk_accuracy"] >= result.test["baseline_accuracy"]
    assert result.test["qk_accuracy"] >= 0.95
    assert result.qk_accuracy.values[tuple(planted)] >= 0.95
    # heads that do not select read the options at chance (4 options)
    assert float(result.qk_accuracy.values[0].max()) < 0.6
    frame = result.samples
    assert set(frame["split"]) == {"validation", "test"} and len(frame) == 120


def test_label_tokens_carry_no_selection_on_the_planted_model(model):
    """The paper reads the options' end tokens; the label tokens precede the option text."""
    config = sc.SelectCopyConfig(labels="letters", format=sc.ZOO_FORMAT, key_token="label")
    r = sc.score(model, sc.zoo_dataset(60, label_set="letters"), config, progress=False)
    assert r.test["qk_accuracy"] < 0.6


def test_evaluate_one_head(model):
    out = sc.evaluate(model, sc.zoo_dataset(40, seed=31_000, label_set="lower"), (2, 1),
                      sc.SelectCopyConfig(labels="lower", format=sc.ZOO_FORMAT))
    assert out["qk_accuracy"] >= 0.95 and out["baseline_accuracy"] >= 0.95
    with pytest.raises(headlab.PlanError, match="layer 7"):
        sc.evaluate(model, [], (7, 0))


def test_user_dataset_rows_and_errors(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "which is a fruit ?", "options": ["saw", "lemon"], "answer": "B"}\n\n'
                    '{"question": "which is a tool ?", "options": ["saw", "lemon"], "answer": 0}\n')
    samples = sc.build_dataset(good)
    assert [s.answer for s in samples] == [1, 0]
    csv = tmp_path / "q.csv"
    csv.write_text("question,option_1,option_2,answer\nwhich is a fruit ?,saw,lemon,1\n")
    assert sc.build_dataset(csv)[0].options == ("saw", "lemon")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n{"question": "q", "options": ["a"], "answer": 0}\n')
    with pytest.raises(HeadlabError, match=r"bad.jsonl, line 2: .*at least 2 options"):
        sc.build_dataset(bad)
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 5}\n')
    with pytest.raises(HeadlabError, match=r"line 1: answer index 5 is outside"):
        sc.build_dataset(bad)
    bad.write_text('{"question": "q", "options": ["a", "b"]}\n')
    with pytest.raises(HeadlabError, match=r"line 1: field 'answer' is missing"):
        sc.build_dataset(bad)
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n{not json\n')
    with pytest.raises(HeadlabError, match=r"line 2: not valid JSON"):
        sc.build_dataset(bad)
    with pytest.raises(HeadlabError, match="unknown label set"):
        sc.SelectCopyConfig(labels="greek").label_tuple()
