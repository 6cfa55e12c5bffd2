"""Ships and path patching through the patched attention equal independent eager re-implementations.

The oracle here loads the same zoo model with transformers' eager attention and intervenes with
plain forward hooks, as the papers' code does: Ships' undifferentiated attention scales the head's
slice of q_proj's output by ε (the reference's `mask_qkv=['q']`), scaling contribution scales the
head's slice of o_proj's input, and path patching replaces slices of o_proj's input with cached
clean or corrupted head outputs.
"""

from __future__ import annotations

import pytest
import torch
from headlab.analyses import conflict, patching, safety

import headlab

MODEL = "zoo:tasks-llama"


@pytest.fixture(scope="module")
def hm():
    return headlab.load_model(MODEL)


@pytest.fixture(scope="module")
def eager():
    return headlab.load_model(MODEL, attn_implementation="eager")


def _layers(model):
    return model.model.layers


def _eager_last_logits(eager, prompts, hooks=()):
    handles = [module.register_forward_hook(fn) if kind == "post" else module.register_forward_pre_hook(fn)
               for module, kind, fn in hooks]
    try:
        out = []
        for p in prompts:
            ids = eager.tokenize(p)
            out.append(eager(**ids).logits[0, -1].float())
        return torch.stack(out)
    finally:
        for h in handles:
            h.remove()


def _scale_q(eager, layer, head, eps):
    hd = eager.spec.head_dim

    def fn(module, inputs, output):
        output = output.clone()
        output[..., head * hd:(head + 1) * hd] *= eps
        return output
    return (_layers(eager.model)[layer].self_attn.q_proj, "post", fn)


def _scale_o_input(eager, layer, head, eps):
    hd = eager.spec.head_dim

    def fn(module, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] *= eps
        return (x,)
    return (_layers(eager.model)[layer].self_attn.o_proj, "pre", fn)


def _kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1) + 1e-12
    q = torch.softmax(q_logits.double(), -1) + 1e-12
    return (p * (p / q).log()).sum(-1)


PROMPTS = safety.zoo_dataset(6, True) + safety.zoo_dataset(2, False)
HEADS = [(0, 4), (0, 6), (1, 2), (3, 7)]


@pytest.mark.parametrize("ablation", ["attention", "output"])
def test_ships_equals_eager_hooks(hm, eager, ablation):
    cfg = safety.SafetyConfig(ablation=ablation, epsilon=1e-4)
    got = safety.ships(hm, PROMPTS, cfg, heads=HEADS, progress=False)
    base = _eager_last_logits(eager, PROMPTS)
    for l, h in HEADS:
        hook = _scale_q(eager, l, h, 1e-4) if ablation == "attention" else _scale_o_input(eager, l, h, 1e-4)
        want = _kl(base, _eager_last_logits(eager, PROMPTS, [hook]))
        torch.testing.assert_close(got.per_query[:, l, h], want, rtol=1e-3, atol=1e-7)
    # heads not asked for stay exactly zero and unmeasured; at least one asked-for head matters on this model
    assert got.per_query[:, 2, 5].abs().max() == 0 and got.scores.values[2, 5].isnan()
    assert got.scores.counts.sum() == len(HEADS)
    assert torch.nan_to_num(got.scores.values, nan=0.0).max() > 1e-3


def test_ships_with_a_noop_ablation_is_zero(hm):
    got = safety.ships(hm, PROMPTS[:4], safety.SafetyConfig(epsilon=1.0), heads=HEADS, progress=False)
    assert got.per_query.abs().max() == 0.0
    got = safety.ships(hm, PROMPTS[:4], safety.SafetyConfig(ablation="output", epsilon=1.0), heads=HEADS, progress=False)
    assert got.per_query.abs().max() == 0.0


def test_uniform_attention_is_uniform(hm):
    req = headlab.StatsRequest(entropy=True)
    ids = hm.tokenize(PROMPTS[0])
    with hm.patched(headlab.InterventionPlan().uniform_attention([(1, 3)], 0.0), req) as rec:
        hm(**ids)
    n = torch.arange(1, ids["input_ids"].shape[1] + 1).float()
    torch.testing.assert_close(rec.stats.entropy[1, 0, 3], n.log())
    assert (rec.stats.entropy[1, 0, 2] - n.log()).abs().max() > 0.1  # the other heads are untouched


def test_subspace_angle():
    a = torch.randn(20, 8, dtype=torch.float64)
    assert safety.subspace_angle(a, a) == pytest.approx(0.0, abs=1e-5)
    assert safety.subspace_angle(a, 3 * a) == pytest.approx(0.0, abs=1e-5)  # a subspace, not a scale
    assert safety.subspace_angle(a, -a) == pytest.approx(0.0, abs=1e-5)     # nor a sign
    u = torch.zeros(4, 3, dtype=torch.float64)
    u[0, 0] = 1.0
    w = torch.zeros(4, 3, dtype=torch.float64)
    w[1, 0] = 1.0
    assert safety.subspace_angle(u, w) == pytest.approx(90.0)
    assert safety.subspace_angle(u, w, space="features") == pytest.approx(0.0, abs=1e-5)  # both along feature 0


def _o_proj_inputs(eager, ids):
    """[L, T, H*hd] o_proj inputs of one prompt."""
    got = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, i=i: got.__setitem__(i, args[0][0].clone())) for i, layer in enumerate(_layers(eager.model))]
    eager(**ids)
    for h in handles:
        h.remove()
    return torch.stack([got[i] for i in range(len(got))])


def _eager_path_patch(eager, clean, corrupt, sender, receivers, metric_tokens):
    hd = eager.spec.head_dim
    L, H = eager.spec.shape
    ids_c, ids_x = eager.tokenize(clean), eager.tokenize(corrupt)
    z_c, z_x = _o_proj_inputs(eager, ids_c), _o_proj_inputs(eager, ids_x)
    sl = lambda h: slice(h * hd, (h + 1) * hd)

    def run_with(replace):
        def make(layer):
            def fn(module, args):
                x = args[0].clone()
                for (l, h), z in replace.items():
                    if l == layer:
                        x[0, :, sl(h)] = z
                return (x,)
            return fn
        handles = [lay.self_attn.o_proj.register_forward_pre_hook(make(i)) for i, lay in enumerate(_layers(eager.model))]
        try:
            zs = _o_proj_inputs(eager, ids_c)
            logits = eager(**ids_c).logits[0, -1].float()
        finally:
            for h in handles:
                h.remove()
        return logits, zs

    def metric(logits):
        return float(logits[metric_tokens[0]] - logits[metric_tokens[1]])

    clean_metric = metric(eager(**ids_c).logits[0, -1].float())
    replace = {sender: z_x[sender[0], :, sl(sender[1])]}
    for l in range(sender[0], L):
        for h in range(H):
            if (l, h) != sender and (receivers is None or (l, h) not in receivers):
                replace[(l, h)] = z_c[l, :, sl(h)]
    logits, zs = run_with(replace)
    if receivers is None:
        return metric(logits) - clean_metric
    logits, _ = run_with({r: zs[r[0], :, sl(r[1])] for r in receivers})
    return metric(logits) - clean_metric


@pytest.mark.parametrize("sender,receivers", [((0, 5), None), ((2, 1), None), ((0, 0), [(1, 2), (2, 6)]), ((1, 3), [(3, 0)])])
def test_path_patching_equals_eager_hooks(hm, eager, sender, receivers):
    samples = conflict.zoo_dataset(3)
    tokens = conflict.answer_tokens(hm, samples)
    pairs = patching.make_pairs(hm, [s.prompt for s in samples], [s.corrupted for s in samples], tokens)
    got = patching.PathPatcher(hm, pairs, conflict.logit_difference).effect([sender], receivers)
    want = torch.tensor([_eager_path_patch(eager, s.prompt, s.corrupted, sender, receivers, tokens[i].tolist())
                         for i, s in enumerate(samples)])
    torch.testing.assert_close(got.double().cpu(), want.double(), rtol=1e-3, atol=1e-4)


def test_path_patching_identity_and_errors(hm):
    samples = conflict.zoo_dataset(4)
    tokens = conflict.answer_tokens(hm, samples)
    same = patching.make_pairs(hm, [s.prompt for s in samples], [s.prompt for s in samples], tokens)
    eff = patching.PathPatcher(hm, same, conflict.logit_difference).effect([(1, 1)])
    assert eff.abs().max() < 1e-4  # patching a head with its own clean output changes nothing
    with pytest.raises(headlab.HeadlabError, match="same number of tokens"):
        patching.make_pairs(hm, ["request : tell me about kite ."], ["request : tell me about kite piano ."])
    pp = patching.PathPatcher(hm, same, conflict.logit_difference)
    with pytest.raises(headlab.HeadlabError, match="no path"):
        pp.effect([(2, 0)], receivers=[(1, 0)])
