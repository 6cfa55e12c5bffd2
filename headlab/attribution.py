"""Attribution patching of attention heads: AtP (Nanda 2023) with the AtP* corrections (Kramár et
al. 2024), and the shared plumbing of head searches that screen with it and verify exactly.

For a metric M (one value per batch row) and a head output z_h [Q, Dv], ablating or patching the
head changes z_h to z'_h; to first order the metric changes by

    Δ̂M_h = Σ_{q, d} (z'_h − z_h)[q, d] · ∂M/∂z_h[q, d]

for every head from one forward and one backward pass (`attribute`). Here:

- **the nodes are head outputs** (z, as they enter the output projection), and z'_h is computed
  exactly, from the same forward's q, k, v, by the patched attention under the ablation plan:
  for an attention-side ablation (uniform attention, a first-token bias, ACT) the softmax is
  recomputed, not linearized — AtP*'s fix for attention saturation, applied to the ablated head;
  only the path from z_h to the metric is linearized;
- `direct=True` detaches every attention's q, k, v, so gradients reach z_h only through the
  residual stream, MLPs and norms: the linear estimate of path patching to the logits (every
  other head frozen);
- `graddrop=True` is AtP*'s GradDrop against cancelling paths: one pass per layer ℓ with the
  gradient through layer ℓ's residual contribution (attention + MLP) dropped, combined as
  (1 / (L − 1)) Σ_ℓ |Δ̂M_h^(ℓ)|. It costs L forward + backward passes per batch.

A metric that is minimal at the clean point (a KL divergence to the clean distribution) has no
first-order term; `kl_estimate` linearizes the logits instead and computes the KL from them.

Exact evaluation shares forward passes through `HeadModel.patched(row_plans=...)`: one batch holds
several single-head plans × the prompts (`row_batches`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from headlab.attention import AttributionCapture
from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan

Head = tuple[int, int]
Metric = Callable[[Any], torch.Tensor]
"""(the model's output) -> [B] or [B, J]: one value (or J values) per batch row, differentiable."""

METHODS = ("exact", "atp")
AUTO_ATP_HEADS = 512
"""`method="auto"` picks attribution + exact verification from this many candidate heads up (a
32-layer × 32-head model has 1024), exhaustive search below it."""


class GradientFreeMetricError(HeadlabError):
    """The metric has no gradient with respect to the head outputs: attribution cannot estimate it."""


def resolve_method(method: str, n_heads: int) -> str:
    """'exact' or 'atp' for a search over `n_heads` candidates ('auto': atp from AUTO_ATP_HEADS up)."""
    if method == "auto":
        return "atp" if n_heads >= AUTO_ATP_HEADS else "exact"
    if method not in METHODS:
        raise HeadlabError(f"method must be 'exact', 'atp' or 'auto', got {method!r}")
    return method


@contextlib.contextmanager
def _no_parameter_grads(model: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside (only activations do); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def decoder_layers(model: HeadModel) -> list[torch.nn.Module]:
    """The blocks that hold each attention module (the residual-stream layers), in layer order."""
    by_layer: dict[int, torch.nn.Module] = {}
    for block in model.model.modules():
        if isinstance(block, torch.nn.ModuleList):
            for child in block:
                for module in model._modules:
                    if any(m is module for m in child.modules()) and child is not module:
                        by_layer[module.layer_idx] = child
    if sorted(by_layer) != list(range(model.spec.n_layers)):
        raise HeadlabError(f"cannot find one decoder block per layer in {model.spec.architecture} (GradDrop needs them)")
    return [by_layer[i] for i in range(model.spec.n_layers)]


@contextlib.contextmanager
def _drop_gradient(block: torch.nn.Module) -> Iterator[None]:
    """The block's output keeps its value, but gradients pass only through its residual (skip) path."""
    stash: dict[str, torch.Tensor] = {}

    def pre(_module, args, kwargs):
        stash["x"] = args[0] if args else kwargs["hidden_states"]

    def post(_module, _args, _kwargs, output):
        x = stash.pop("x")
        if isinstance(output, tuple):
            return (x + (output[0] - x).detach(), *output[1:])
        return x + (output - x).detach()

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Attribution:
    """Linear estimates of every ablated head's effect on a batch."""

    values: torch.Tensor
    """[J, B, L, H] fp64: first-order change of metric column j of row b when head (l, h) is ablated
    alone (0 for heads the ablation does not touch; with GradDrop, the combined magnitudes)."""
    metric: torch.Tensor
    """[B, J] the metric on the clean input."""
    covered: torch.Tensor
    """[L, H] bool: the heads the ablation plan touches."""


def attribute(model: HeadModel, inputs: Mapping[str, torch.Tensor], metric: Metric, ablation: InterventionPlan,
              *, direct: bool = False, graddrop: bool = False) -> Attribution:
    """First-order effect of ablating each head of `ablation` on `metric`, for the batch `inputs`
    (the model's keyword arguments: input_ids, attention_mask, ...). One forward and J backward
    passes (J = the metric's columns); with `graddrop`, L of each."""
    if ablation.is_empty():
        raise HeadlabError("the ablation plan is empty: name the heads to attribute (e.g. plan.prune_heads(heads))")
    L, H = model.spec.shape
    covered = torch.zeros(L, H, dtype=torch.bool)
    for l, h in ablation.heads():
        covered[l, h] = True
    drops: list[int | None] = [None]
    if graddrop:
        if direct:
            raise HeadlabError("GradDrop splits the paths through later layers; direct (path-to-logits) attribution has none to split")
        drops = list(range(L))
    total: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    blocks = decoder_layers(model) if graddrop else []
    for drop in drops:
        values, clean = _attribute_once(model, inputs, metric, ablation, direct, None if drop is None else blocks[drop])
        if graddrop:
            values = values.abs()
        total = values if total is None else total + values
    assert total is not None and clean is not None
    if graddrop:
        total = total / max(L - 1, 1)
    return Attribution(values=total, metric=clean, covered=covered)


def _attribute_once(model: HeadModel, inputs: Mapping[str, torch.Tensor], metric: Metric, ablation: InterventionPlan,
                    direct: bool, dropped: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    L, H = model.spec.shape
    capture = AttributionCapture(ablation=ablation, direct=direct)
    drop = _drop_gradient(dropped) if dropped is not None else contextlib.nullcontext()
    with torch.enable_grad(), _no_parameter_grads(model.model), model.patched(capture=capture), drop:
        out = model.model(**inputs)
        m = metric(out)
        if m.dim() == 1:
            m = m[:, None]
        if m.dim() != 2:
            raise HeadlabError(f"the metric must return one value (or one row of values) per batch row, got shape {tuple(m.shape)}")
        if not m.requires_grad:
            raise GradientFreeMetricError(
                "the metric has no gradient with respect to the head outputs (computed without autograd: an accuracy, "
                "an argmax, a .detach() or .item()?); attribution cannot estimate it — use method='exact'")
        layers = sorted(capture.outputs)
        outputs = [capture.outputs[layer] for layer in layers]
        B, J = m.shape
        values = torch.zeros(J, B, L, H, dtype=torch.float64)
        for j in range(J):
            # Rows never interact, so the gradient of the column's sum is every row's own gradient.
            grads = torch.autograd.grad(m[:, j].sum(), outputs, retain_graph=j < J - 1, allow_unused=True)
            for layer, g in zip(layers, grads):
                if g is not None:
                    values[j, :, layer] = (g.double() * capture.deltas[layer].double()).sum((2, 3)).cpu()
    return values, m.detach().double().cpu()


def kl_estimate(model: HeadModel, inputs: Mapping[str, torch.Tensor], last: torch.Tensor, ablation: InterventionPlan,
                top_tokens: int = 8, graddrop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attribution estimate of KL(p ‖ p_h), p the clean next-token distribution at position `last`
    [B] of each row and p_h the distribution with head h ablated: [B, L, H] fp64, and the
    probability mass [B] of p the estimate follows token by token.

    KL's gradient is zero at the clean point, so AtP's linear term says nothing. Instead the
    *logits* are linearized and the KL is computed exactly from them (in AtP*'s spirit: linearize
    up to a nonlinearity, then recompute it). With c_y = Δℓ_y − p·Δℓ the first-order change of
    token y's logit relative to the p-weighted mean,

        KL(p ‖ softmax(ℓ + Δℓ)) = log Σ_y p_y exp(c_y),

    summed exactly over the `top_tokens` most likely tokens (one backward pass each) and over the
    rest as one pseudo-token (c = their p-weighted mean change, weight = their mass; one more
    pass). Its second-order expansion is the Fisher form ½ Σ_y p_y c_y²; unlike that form it stays
    right when p is saturated (a refusal flipped to an answer). By Jensen the tail term is a lower
    bound of the tail's own, exact when the tail's logits move together.
    """
    if top_tokens < 1:
        raise HeadlabError(f"top_tokens must be >= 1, got {top_tokens}")
    rows = torch.arange(len(last))
    state: dict[str, torch.Tensor] = {}

    def columns(out: Any) -> torch.Tensor:
        logits = out.logits[rows.to(out.logits.device), last.to(out.logits.device)].float()  # [B, V]
        p = torch.softmax(logits.detach().double(), -1).float()
        k = min(top_tokens, logits.shape[-1] - 1)
        top = p.topk(k, -1)
        centre = (p * logits).sum(-1, keepdim=True)  # p·ℓ, p held fixed
        cols = logits.gather(-1, top.indices) - centre  # [B, k]
        tail = p.scatter(-1, top.indices, 0.0)
        mass = tail.sum(-1, keepdim=True)
        tail_col = (tail * logits).sum(-1, keepdim=True) / mass.clamp_min(1e-30) - centre
        state["weights"] = torch.cat([top.values, mass], -1).double().cpu()
        state["covered"] = top.values.sum(-1).double().cpu()
        return torch.cat([cols, tail_col], -1)

    att = attribute(model, inputs, columns, ablation, graddrop=graddrop)
    log_w = state["weights"].T.log()[:, :, None, None]  # [J, B, 1, 1]
    kl = torch.logsumexp(log_w + att.values, 0)
    return kl.clamp_min(0.0) * att.covered.double(), state["covered"]


def row_batches(heads: Sequence[Head], n_rows: int, max_rows: int) -> Iterator[tuple[list[Head], slice]]:
    """Chunks for batched exact evaluation: (heads, prompt rows) whose product fits `max_rows` —
    several heads × all prompts when the prompts fit, else one head × a slice of the prompts."""
    if max_rows < 1:
        raise HeadlabError(f"the batch size must be >= 1, got {max_rows}")
    if n_rows <= max_rows:
        per = max(1, max_rows // n_rows)
        for i in range(0, len(heads), per):
            yield list(heads[i:i + per]), slice(0, n_rows)
        return
    for head in heads:
        for i in range(0, n_rows, max_rows):
            yield [head], slice(i, min(n_rows, i + max_rows))


@dataclass
class Verification:
    """How the attribution estimate compares with the exact values on the verified heads."""

    heads: list[Head]
    estimate: list[float]
    exact: list[float]

    def summary(self) -> dict[str, Any]:
        """Errors of the estimate on the verified heads (absolute, relative to the exact spread) and
        the rank correlation between the two orders."""
        if not self.heads:
            return {"verified": 0}
        e = torch.tensor(self.estimate, dtype=torch.float64)
        x = torch.tensor(self.exact, dtype=torch.float64)
        err = (e - x).abs()
        scale = float(x.abs().max()) or 1.0
        out = {"verified": len(self.heads), "mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
               "max_abs_error_relative": float(err.max()) / scale}
        if len(self.heads) > 2:
            out["spearman"] = _spearman(e, x)
        return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom else float("nan")


def top_heads(values: torch.Tensor, heads: Sequence[Head], k: int) -> list[Head]:
    """The k of `heads` with the largest `values` [L, H] (ties: the earlier head)."""
    order = sorted(heads, key=lambda h: (-float(values[h]), h))
    return order[:k]
