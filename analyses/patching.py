"""Path patching of attention heads (Wang et al. 2023, "Interpretability in the Wild"; Goldowsky-Dill
et al. 2023), through the patched attention's head-output replacement.

Clean and corrupted inputs come in pairs of equal token length (positions must line up). A
*sender* head's output z is replaced by its output on the corrupted input, and the effect is
allowed to travel only along chosen paths:

- to the logits (`receivers=None`): every other attention head in the sender's layer and after
  is frozen at its clean output, MLPs and norms are recomputed — so only the sender's direct path
  through the residual stream (and the MLPs) reaches the logits;
- to receiver heads: run 1 patches the senders, freezes every head that is neither sender nor
  receiver at its clean output, and records the receivers' outputs (which see the senders' effect
  through their queries, keys and values); run 2 patches only the receivers with those outputs
  and lets everything downstream recompute.

The effect of a patch is `metric(patched) − metric(clean)`, per pair; `metric(logits, targets)`
maps the last-token logits [B, V] of a batch and the pairs' `targets` rows (e.g. the token ids of
the answers the metric compares; None when the pairs have none) to one number per pair [B].
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from headlab.generate import encode, right_padded
from tqdm.auto import tqdm

from headlab import attribution
from headlab.checkpoint import cached
from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.scores import HeadScores
from headlab.stats import StatsRequest

Head = tuple[int, int]
Metric = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(last-token logits [B, V] fp32, the batch's targets [B, ...] or None) -> one value per pair [B]."""


@dataclass
class PatchingPairs:
    """Tokenized clean/corrupted pairs, right-padded to one width: ids [B, T], mask [B, T], last [B],
    and optional per-pair `targets` [B, ...] handed to the metric."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.clean.shape[0]

    def select(self, rows: slice) -> PatchingPairs:
        return PatchingPairs(self.clean[rows], self.corrupted[rows], self.mask[rows], self.last[rows],
                             None if self.targets is None else self.targets[rows])


def make_pairs(model: HeadModel, clean: Sequence[str], corrupted: Sequence[str],
               targets: torch.Tensor | None = None) -> PatchingPairs:
    """Tokenize pairs; each corrupted prompt must have as many tokens as its clean prompt."""
    if len(clean) != len(corrupted) or not clean:
        raise HeadlabError(f"path patching needs as many corrupted prompts as clean ones (at least one), got {len(clean)} and {len(corrupted)}")
    a, b = encode(model, clean), encode(model, corrupted)
    for i, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y):
            raise HeadlabError(
                f"pair {i}: the clean prompt has {len(x)} tokens and the corrupted one {len(y)}; path patching replaces "
                "outputs position by position, so build the corrupted prompt with the same number of tokens "
                "(swap single-token words)")
    ids_a, mask, last = right_padded(model, a)
    ids_b, _, _ = right_padded(model, b)
    if targets is not None and targets.shape[0] != len(clean):
        raise HeadlabError(f"targets has {targets.shape[0]} rows for {len(clean)} pairs")
    return PatchingPairs(ids_a, ids_b, mask, last, None if targets is None else targets.to(ids_a.device))


def head_outputs(model: HeadModel, ids: torch.Tensor, mask: torch.Tensor, plan: InterventionPlan | None = None,
                 layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-token logits [B, V] fp32, head outputs z [L', B, H, T, Dv] of `layers` (default all)) under `plan`."""
    request = StatsRequest(head_outputs=True, layers=None if layers is None else list(layers))
    with model.patched(plan, request) as rec:
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, rec.stats.head_outputs


def _last(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(len(last), device=logits.device), last].float()


def _freeze(z: torch.Tensor, heads: Sequence[Head]) -> dict[Head, torch.Tensor]:
    return {(l, h): z[l, :, h] for l, h in heads}


class PathPatcher:
    """Path patching on one batch of pairs: caches the clean and corrupted head outputs once."""

    def __init__(self, model: HeadModel, pairs: PatchingPairs, metric: Metric):
        self.model, self.pairs, self.metric = model, pairs, metric
        logits, self.z_clean = head_outputs(model, pairs.clean, pairs.mask)
        _, self.z_corrupted = head_outputs(model, pairs.corrupted, pairs.mask)
        self.clean_metric = metric(_last(logits, pairs.last), pairs.targets)
        L, H = model.spec.shape
        self.all_heads = [(l, h) for l in range(L) for h in range(H)]

    def run(self, plan: InterventionPlan) -> torch.Tensor:
        """metric [B] of the clean input under `plan`."""
        with self.model.patched(plan):
            logits = self.model(input_ids=self.pairs.clean, attention_mask=self.pairs.mask).logits
        return self.metric(_last(logits, self.pairs.last), self.pairs.targets)

    def attribution(self, senders: Sequence[Head]) -> torch.Tensor:
        """[B, L, H] linear estimate of each sender's effect on the metric when path-patched to the
        logits (0 for heads not among `senders`)."""
        plan = InterventionPlan().patch_heads(_freeze(self.z_corrupted, senders))
        pairs = self.pairs

        def value(out: Any) -> torch.Tensor:
            return self.metric(_last(out.logits, pairs.last), pairs.targets)

        att = attribution.attribute(self.model, {"input_ids": pairs.clean, "attention_mask": pairs.mask}, value, plan,
                                    direct=True)
        return att.values[0]

    def effect(self, senders: Sequence[Head], receivers: Sequence[Head] | None = None) -> torch.Tensor:
        """metric(patched) − metric(clean) per pair [B], for the path senders → receivers (or logits)."""
        senders = list(senders)
        if not senders:
            raise HeadlabError("path patching needs at least one sender head")
        for h in senders + list(receivers or []):
            self.model.spec.check_head(*h, what="path-patching head")
        first = min(l for l, _ in senders)
        sent = InterventionPlan().patch_heads(_freeze(self.z_corrupted, senders))
        if receivers is None:
            # Heads before the first sender's layer see nothing of it: freezing them changes nothing.
            frozen = [h for h in self.all_heads if h[0] >= first and h not in senders]
            return self.run(sent + InterventionPlan().patch_heads(_freeze(self.z_clean, frozen))) - self.clean_metric
        receivers = list(receivers)
        if any(r in senders for r in receivers):
            raise HeadlabError("a head cannot be both sender and receiver")
        if max(l for l, _ in receivers) < first:
            raise HeadlabError(f"receivers {receivers} all sit before the first sender layer {first}: no path connects them")
        frozen = [h for h in self.all_heads if h[0] >= first and h not in senders and h not in receivers]
        plan1 = sent + InterventionPlan().patch_heads(_freeze(self.z_clean, frozen))
        layers = sorted({l for l, _ in receivers})
        _, z = head_outputs(self.model, self.pairs.clean, self.pairs.mask, plan1, layers)
        recorded = {(l, h): z[layers.index(l), :, h] for l, h in receivers}
        return self.run(InterventionPlan().patch_heads(recorded)) - self.clean_metric


@dataclass
class PatchingResult:
    effect: HeadScores
    """Mean effect over pairs of patching each sender head (metric(patched) − metric(clean)).
    With method="atp": exact for the verified heads, unmeasured (NaN, count 0) for the others."""
    per_pair: torch.Tensor
    """[N, L, H] effect of each sender head on each pair (0 for heads not scanned; the estimate
    for heads that were estimated but not verified)."""
    clean_metric: torch.Tensor
    """[N] metric on the clean inputs."""
    method: str = "exact"
    exact: torch.Tensor | None = None
    """[L, H] bool: the heads evaluated exactly."""
    estimate: HeadScores | None = None
    """method="atp": the attribution estimate of every sender's mean effect."""
    verification: dict = field(default_factory=dict)


def scan(model: HeadModel, pairs: PatchingPairs, metric: Metric, senders: Sequence[Head] | None = None,
         receivers: Sequence[Head] | None = None, batch_size: int = 32, progress: bool = True,
         cache: MutableMapping[str, Any] | None = None, name: str = "path_patching", method: str = "exact",
         verify: int = 32) -> PatchingResult:
    """Path-patch every sender head in turn (default: every head, or every head before the
    receivers' last layer) to `receivers` (default: the logits). `cache` keeps finished heads.

    method="atp" (path patching to the logits only): the linear estimate of every sender at once
    (`attribution.attribute` with `direct=True`: gradients through the residual stream and MLPs
    only, as path patching leaves them), then the `verify` senders with the largest |estimate|
    patched exactly (both signs: a search may want either end). "auto": atp from
    `attribution.AUTO_ATP_HEADS` senders up.
    """
    L, H = model.spec.shape
    if senders is None:
        top = L if receivers is None else max(l for l, _ in receivers)
        senders = [(l, h) for l in range(top) for h in range(H) if receivers is None or (l, h) not in receivers]
    senders = list(senders)
    for h in senders:
        model.spec.check_head(*h, what="path-patching sender")
    method = attribution.resolve_method(method, len(senders))
    if method == "atp" and receivers is not None:
        raise HeadlabError("method='atp' estimates path patching to the logits; for receiver heads use method='exact'")
    if verify < 0:
        raise HeadlabError(f"verify must be >= 0 (how many of the best-estimated heads to patch exactly), got {verify}")
    n = len(pairs)
    per_pair = torch.zeros(n, L, H, dtype=torch.float64)
    patchers: list[PathPatcher] = []
    clean = []
    for i in range(0, n, batch_size):
        p = PathPatcher(model, pairs.select(slice(i, i + batch_size)), metric)
        patchers.append(p)
        clean.append(p.clean_metric.double().cpu())
    params: dict[str, Any] = {"receivers": None if receivers is None else [list(r) for r in receivers], "n": n,
                              "method": method}
    estimate = None
    todo = senders
    if method == "atp":
        params["verify"] = verify
        for i, p in enumerate(tqdm(patchers, desc=f"{name} attribution", disable=not progress)):
            def run(p=p) -> list:
                return p.attribution(senders).tolist()
            rows = slice(i * batch_size, i * batch_size + len(p.pairs))
            per_pair[rows] = torch.tensor(cached(cache, f"pp-atp:{rows.start}-{rows.stop}->logits", run), dtype=torch.float64)
        mean_est = per_pair.mean(0)
        estimate = HeadScores.from_tensor(mean_est, f"{name}_estimate", model=model.name, params=params)
        high = attribution.top_heads(mean_est, senders, verify)
        low = attribution.top_heads(-mean_est, senders, verify)
        todo = high + [h for h in low if h not in high]
    exact = torch.zeros(L, H, dtype=torch.bool)
    rkey = "logits" if receivers is None else ",".join(f"L{l}H{h}" for l, h in receivers)
    for head in tqdm(todo, desc=name, disable=not progress):
        def run(head=head) -> list[float]:
            return torch.cat([p.effect([head], receivers).double().cpu() for p in patchers]).tolist()
        per_pair[:, head[0], head[1]] = torch.tensor(cached(cache, f"pp:L{head[0]}H{head[1]}->{rkey}", run), dtype=torch.float64)
        exact[head] = True
    verification: dict = {}
    if method == "atp":
        verification = attribution.Verification(
            heads=todo, estimate=[float(estimate.values[h]) for h in todo],
            exact=[float(per_pair[:, h[0], h[1]].mean()) for h in todo]).summary()
        params["verification"] = verification
    measured = exact.double()
    effect = HeadScores.from_tensor(per_pair.mean(0), name, counts=measured, model=model.name, params=params)
    return PatchingResult(effect=effect, per_pair=per_pair, clean_metric=torch.cat(clean), method=method, exact=exact,
                          estimate=estimate, verification=verification)
