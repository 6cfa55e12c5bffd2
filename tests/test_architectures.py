"""Every supported architecture: the "headlab" attention equals eager attention (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers

import headlab
from tests.conftest import CAUSAL_ARCHS, TINY_CONFIGS, VOCAB

ALL_STATS = headlab.StatsRequest(argmax=True, entropy=True, received=True, head_outputs=True, spans={"first": [0]})


def _eager(path):
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _batch(causal: bool, length: int = 24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    if causal:
        mask[1, :7] = 0  # left padding, as for generation
    else:
        mask[1, -7:] = 0  # right padding, as for encoders
    return ids, mask


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_prefill_matches_eager(arch, tiny_dirs):
    path = tiny_dirs(arch)
    model = headlab.load_model(path)
    assert model.model.config._attn_implementation == "headlab"
    eager = _eager(path)
    ids, mask = _batch(model.spec.causal)
    with torch.no_grad():
        expected = _output(eager(input_ids=ids, attention_mask=mask))
    keep = mask.bool()
    plain = _output(model(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(plain[keep], expected[keep], atol=1e-5, rtol=1e-5)
    # Inside a session with an empty plan and every stat, the exact reference path runs.
    with model.patched(headlab.InterventionPlan(), ALL_STATS) as rec:
        patched = _output(model(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(patched[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert rec.stats.layers == list(range(model.spec.n_layers))
    assert not torch.isnan(rec.stats.entropy).any()


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_cached_generation_matches_eager(arch, tiny_dirs):
    path = tiny_dirs(arch)
    model = headlab.load_model(path)
    eager = _eager(path)
    ids, mask = _batch(True, length=12)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(input_ids=ids, attention_mask=mask, **kw)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Decoding inside a session: one stat column per step, same tokens. Head outputs do not
    # depend on key positions, so they work past a sliding window too (gemma2/3 here).
    request = headlab.StatsRequest(head_outputs=True, queries=slice(-1, None))
    with model.patched(None, request) as rec:
        again = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(again.sequences, expected.sequences)
    for a, b in zip(again.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    steps = kw["max_new_tokens"]  # prefill + (steps - 1) decode calls, one query each
    assert rec.stats.head_outputs.shape == (model.spec.n_layers, 2, model.spec.n_heads, steps, model.spec.head_dim)
    assert rec.stats.query_positions.tolist() == list(range(11, 11 + steps))


def test_spec_reads_config(tiny_dirs):
    spec = headlab.load_model(tiny_dirs("qwen2")).spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2, 4, 1, 16)
    assert spec.architecture == "Qwen2ForCausalLM" and spec.causal and spec.modality == "text"
    assert not headlab.load_model(tiny_dirs("bert")).spec.causal
