"""The sinks analysis: identical to a materialized eager computation; real sinks on MiniLM."""

from __future__ import annotations

import pytest
import torch
import transformers

import headlab
from headlab import zoo
from headlab.analyses import sinks
from headlab.errors import HeadlabError
from headlab.zoo import tasks

LONG_TEXTS = [
    "the old bridge over the river was built from grey stone more than two hundred years ago , and people still cross it"
    " every morning on their way to the market in the centre of the town .",
    "attention heads in transformer models often send most of their attention to the first token or to separator tokens"
    " when nothing else in the sentence is relevant to the query they are computing .",
]


def test_first_token_mass_and_hidden_sinks_match_materialized_attention():
    model = headlab.load_model("zoo:tasks-llama")
    text = tasks.held_out("needle", 1, length=(40, 60))[0].prompt
    report = sinks.score(model, [text], progress=False)
    eager = transformers.AutoModelForCausalLM.from_pretrained(zoo.path("tasks-llama"), attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    ids = model.tokenize(text)["input_ids"]
    with torch.no_grad():
        attn = torch.stack(eager(ids, output_attentions=True).attentions)[:, 0]  # [L, H, N, N]
    n = attn.shape[-1]
    torch.testing.assert_close(report.first_token_mass.values.float(), attn[..., 0].mean(-1), atol=1e-5, rtol=1e-5)
    r = attn.sum(dim=2) / torch.arange(n, 0, -1)  # ACT's r[j]
    expected = {(l, h, j) for l, h, j in (r[..., 1:] > 0.1).nonzero().tolist()}
    found = {(row.layer, row.head, row.position - 1) for row in report.hidden_sinks.itertuples()}
    assert found == expected and found
    assert report.hidden_sink_rate.values.max() == 1.0


def test_minilm_cls_and_sep_sinks_and_massive_activation():
    model = headlab.load_model("zoo:minilm-l6")
    report = sinks.score(model, LONG_TEXTS, progress=False)
    # [CLS] (the first token) takes most of the attention of several heads ...
    assert sum(s > 0.5 for _, _, s in report.first_token_mass.top(72)) >= 5
    # ... and the strongest hidden sink beyond it is punctuation (the sentence-final "." here,
    # r = 0.43; [SEP] itself is not one on these longer texts).
    hidden = report.hidden_sinks
    assert hidden.loc[hidden.received.idxmax(), "token"] in {".", ",", "[SEP]"}
    assert 0 < report.fraction_of_heads_with_hidden_sinks < 0.5
    # The largest residual activation of most layers sits on [CLS], far above the median.
    top = report.top_activation
    assert (top.token == "[CLS]").mean() > 0.7
    assert top.ratio_to_median.max() > 20
    strict = sinks.score(model, LONG_TEXTS[:1], sinks.SinksConfig(massive_abs=5.0, massive_ratio=20.0), progress=False)
    assert len(strict.massive) > 0 and strict.massive.token.value_counts().idxmax() == "[CLS]"
    assert sinks.score(model, LONG_TEXTS[:1], progress=False).massive.empty  # the paper's 100 / 1000x: none in MiniLM


def test_dataset_from_file_and_errors(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert sinks.build_dataset(path=str(path)) == ["first line", "second line"]
    with pytest.raises(HeadlabError, match="at least one"):
        sinks.build_dataset([])
