"""Token-match stats and the `patterns` analysis: equal to eager attention, and to TransformerLens's
`detect_head` through a TransformerBridge of every zoo text model."""

from __future__ import annotations

import pytest
import torch

import headlab
from headlab import StatsRequest
from headlab.analyses import patterns
from headlab.errors import HeadlabError, PlanError
from headlab.model import load_model
from headlab.stats import TokenMatch
from headlab.zoo import corpus

ZOO_TEXT = ["tasks-llama", "mcqa-planted", "safety-conflict", "pycode-llama"]


def test_token_match_mass_equals_eager_attention(llama_dir):
    """Random labels, strict and not, batch of 2, a query window: the mass on each query's
    matching keys equals the eager attention matrix summed over them."""
    model, eager = load_model(llama_dir), load_model(llama_dir, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 24), generator=g)
    ql, kl = torch.randint(0, 4, (2, 24), generator=g), torch.randint(0, 4, (24,), generator=g)
    request = StatsRequest(matches={"s": TokenMatch(ql, kl, strict=True), "n": TokenMatch(ql, kl, strict=False)},
                           queries=slice(5, None))
    with model.patched(None, request) as rec:
        model(ids)
    attn = torch.stack(eager(ids, output_attentions=True).attentions).float()  # [L, B, H, N, N]
    pos = torch.arange(24)
    for name, strict in (("s", True), ("n", False)):
        before = pos[None, :] < pos[:, None] if strict else pos[None, :] <= pos[:, None]
        mask = (ql[:, :, None] == kl[None, None, :]) & before  # [B, Q, K]
        expected = (attn * mask[None, :, None]).sum(-1)[..., 5:]
        torch.testing.assert_close(rec.stats.match_mass(name), expected, atol=1e-5, rtol=1e-5)


def test_token_match_bad_input(llama_dir):
    model = load_model(llama_dir)
    with pytest.raises(PlanError, match="integer tensor"):
        StatsRequest(matches={"x": TokenMatch(torch.zeros(8), torch.zeros(8))}).validate(model.spec)
    with pytest.raises(PlanError, match="label every position"):
        with model.patched(None, StatsRequest(matches={"x": TokenMatch(torch.zeros(4, dtype=torch.long),
                                                                       torch.zeros(4, dtype=torch.long))})):
            model(torch.randint(3, 60, (1, 12)))
    with pytest.raises(PlanError, match="was not requested"):
        with model.patched(None, StatsRequest(argmax=True)) as rec:
            model(torch.randint(3, 60, (1, 12)))
        rec.stats.match_mass("x")
    with pytest.raises(HeadlabError, match="unknown pattern kinds"):
        patterns.PatternsConfig(kinds=("copying",))


def test_detection_patterns_equal_transformer_lens_patterns():
    """The TokenMatch of each kind marks exactly TL's detection pattern (ones below the diagonal)."""
    hd = pytest.importorskip("transformer_lens.head_detector")
    ids = torch.tensor([0, 5, 6, 5, 5, 7, 6, 5, 8])
    pos = torch.arange(ids.numel())
    for kind in patterns.KINDS:
        for bos in (False, True):
            for cur in (False, True):
                m = patterns.token_match(ids, kind, bos, cur)
                before = pos[None, :] < pos[:, None] if m.strict else pos[None, :] <= pos[:, None]
                ours = ((m.query_labels[:, None] == m.key_labels[None, :]) & before).float()
                theirs = getattr(hd, f"get_{patterns.TL_NAMES[kind]}_detection_pattern")(ids[None]).clone()
                if bos:
                    theirs[:, 0] = 0
                if cur:
                    theirs.fill_diagonal_(0)
                assert torch.equal(ours, theirs), (kind, bos, cur)


@pytest.fixture(scope="module")
def tl():
    return pytest.importorskip("transformer_lens")


@pytest.mark.parametrize("name", ZOO_TEXT)
def test_scores_equal_detect_head_through_a_bridge(tl, name):
    from transformer_lens.head_detector import detect_head
    from transformer_lens.model_bridge import TransformerBridge

    from headlab import zoo

    model = headlab.load_model(f"zoo:{name}")
    if name == "pycode-llama":
        texts = corpus.texts(model.tokenizer, n=2, max_tokens=160) + ["x = foo(bar)\ny = foo(bar)\n" * 3]
    else:
        from headlab.zoo import tasks
        import random

        texts = [tasks.needle(random.Random(s), length=(20, 40)).prompt for s in range(3)]
    bridge = TransformerBridge.boot_transformers(str(zoo.path(name)), device="cpu")
    for exclude_bos, exclude_current in ((False, False), (True, True)):
        config = patterns.PatternsConfig(exclude_bos=exclude_bos, exclude_current_token=exclude_current)
        ours = patterns.score(model, patterns.encode_texts(model, texts), config, progress=False)
        for kind in patterns.KINDS:
            theirs = detect_head(bridge, texts, patterns.TL_NAMES[kind], exclude_bos=exclude_bos,
                                 exclude_current_token=exclude_current)
            torch.testing.assert_close(ours.scores[kind].values, theirs.double(), atol=1e-4, rtol=0)


def test_induction_heads_emerged_in_the_real_text_model():
    """On repeated random tokens, zoo:pycode-llama has strong induction heads (nothing planted them)."""
    model = headlab.load_model("zoo:pycode-llama")
    res = patterns.score(model, patterns.repeated_random_tokens(model, n=4, length=64, seed=3), progress=False)
    # on a block repeated twice the score's ceiling is ~0.5 (first-copy queries have no induction target)
    layer, _, best = res.scores["induction"].top(1)[0]
    assert best > 0.25 and layer > 0  # past layer 0: induction composes with an earlier previous-token head
    prev_layer, _, prev = res.scores["previous_token"].top(1)[0]
    assert prev > 0.8 and prev_layer < layer
    assert res.scores["induction"].values.median() < best / 50  # sparse: most heads are not induction heads
