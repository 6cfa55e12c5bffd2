"""ACT — Attention Calibration Technique (Yu et al., ICML 2024): which heads to calibrate, and
the evaluation before/after.

The calibration itself (METHODS.md, reference code GATECH-EIC/ACT) runs inside the patched
attention (`InterventionPlan.act`): per input, the sink set of a head is {j : r[j] > τ} minus its
first element, r[j] the received attention averaged over the queries that see j; sinks keep β·A
and the removed mass goes to the other keys in proportion to their attention (τ = 0.1, β = 0.4).

Head filtering, as the reference's `scripts/calibration.sh` + `main.py --calibrate 1` do it:
each candidate head is calibrated *alone* on a calibration set (900 samples in the reference)
and scored by accuracy; the heads whose accuracy beats the uncalibrated model are kept and
calibrated together at evaluation. Candidates: layers 2..L−2 (the reference sweeps layers 2–30
of Llama-2-7B's 32) and every head (the reference sweeps heads 0–3 only, to save time: pass
`heads=(0, 1, 2, 3)` to reproduce that).

    result = act.search(model, calibration_samples)
    act.evaluate(model, test_samples, result.plan)
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.analyses import choice
from headlab import attribution
from headlab.checkpoint import cached
from headlab.errors import HeadlabError
from headlab.jobs import COMMON_HELP, METHODS
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.scores import HeadScores

Head = tuple[int, int]


@dataclass(frozen=True)
class ACTConfig:
    beta: float = 0.4
    tau: float = 0.1
    layers: Sequence[int] | None = None
    """Candidate layers; None: 2..L−2 as the reference (all layers when the model has fewer than 4)."""
    heads: Sequence[int] | None = None
    """Candidate head indices in each layer; None: all."""
    min_gain: float = 0.0
    """A head is kept when its calibration accuracy exceeds the baseline by more than this."""
    batch_size: int = 32

    def candidate_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return list(range(2, n_layers - 1)) if n_layers >= 4 else list(range(n_layers))


@dataclass
class ACTResult:
    plan: InterventionPlan
    """ACT on the kept heads (an empty plan when no head helped)."""
    heads: list[Head]
    baseline_accuracy: float
    calibrated_accuracy: float
    """Calibration-set accuracy without ACT and with ACT on all kept heads."""
    gains: HeadScores
    """Per head: accuracy gain when calibrated alone (0 for heads not searched)."""
    searched: list[Head]
    """The heads calibrated exactly (every candidate with method="exact"; the screened ones with "atp")."""
    samples: Any = None
    params: dict = field(default_factory=dict)
    loss_estimate: HeadScores | None = None
    """method="atp": per candidate, the estimated change of the task loss when calibrated alone."""


def search(model: HeadModel, samples: Sequence[choice.ChoiceSample], config: ACTConfig = ACTConfig(),
           base_plan: InterventionPlan | None = None, progress: bool = True,
           cache: MutableMapping[str, Any] | None = None, method: str = "exact", screen: int = 32) -> ACTResult:
    """Calibrate each candidate head alone, keep those that raise accuracy, measure them together.

    `base_plan` is applied underneath every evaluation (e.g. a perturbation under study); the
    returned plan includes it. `cache` (e.g. a run's `Checkpoint`) keeps every evaluation: a
    resumed search skips them. method="atp" screens first: an attribution estimate of every
    candidate's effect on the task loss (`choice.loss_attribution`, one forward + backward per
    batch), then only the `screen` candidates with the largest estimated loss decrease are
    calibrated exactly; the others stay unmeasured (count 0 in `gains`). "auto": atp from
    `attribution.AUTO_ATP_HEADS` candidates up.
    """
    base_plan = base_plan if base_plan is not None else InterventionPlan()
    samples = choice.build_dataset(samples=samples)
    L, H = model.spec.shape
    heads_idx = list(range(H)) if config.heads is None else list(config.heads)
    candidates = [(l, h) for l in config.candidate_layers(L) for h in heads_idx]
    for l, h in candidates:
        model.spec.check_head(l, h, "ACT candidate")
    if not candidates:
        raise HeadlabError("ACT has no candidate heads: pass `layers` and/or `heads`")
    method = attribution.resolve_method(method, len(candidates))
    params: dict[str, Any] = {"beta": config.beta, "tau": config.tau, "n": len(samples), "min_gain": config.min_gain,
                              "method": method}
    todo = candidates
    estimate = None
    if method == "atp":
        if not base_plan.is_empty():
            raise HeadlabError("method='atp' screens the unmodified model; with a base_plan use method='exact'")
        if screen < 1:
            raise HeadlabError(f"screen must be >= 1 (how many candidates to calibrate exactly), got {screen}")
        ablation = InterventionPlan().act(candidates, beta=config.beta, tau=config.tau)
        est = cached(cache, "atp-loss", lambda: choice.loss_attribution(model, samples, ablation, config.batch_size).mean(0).tolist())
        estimate = torch.tensor(est, dtype=torch.float64)
        todo = attribution.top_heads(-estimate, candidates, screen)
        params["screen"] = screen
    base = cached(cache, "base", lambda: choice.accuracy(model, samples, base_plan, config.batch_size))
    gains = torch.zeros(L, H, dtype=torch.float64)
    measured = torch.zeros(L, H, dtype=torch.float64)
    for head in tqdm(todo, desc="act search", disable=not progress):
        plan = base_plan + InterventionPlan().act([head], beta=config.beta, tau=config.tau)
        gains[head] = cached(cache, f"L{head[0]}H{head[1]}", lambda plan=plan: choice.accuracy(model, samples, plan, config.batch_size)) - base
        measured[head] = 1.0
    kept = [h for h in todo if gains[h] > config.min_gain]
    plan = base_plan + InterventionPlan().act(kept, beta=config.beta, tau=config.tau) if kept else base_plan
    together = cached(cache, "kept:" + ",".join(f"L{l}H{h}" for l, h in kept),
                      lambda: choice.accuracy(model, samples, plan, config.batch_size)) if kept else base
    if method == "exact":
        measured = torch.ones(L, H, dtype=torch.float64)  # heads outside the candidates: 0 gain, as before
    result = ACTResult(plan=plan, heads=kept, baseline_accuracy=base, calibrated_accuracy=together,
                       gains=HeadScores.from_tensor(gains, "act_gain", counts=measured, model=model.name, params=params),
                       searched=todo, params=params)
    if estimate is not None:
        result.loss_estimate = HeadScores.from_tensor(estimate, "act_loss_estimate", model=model.name, params=params)
    return result


def calibrate_sinks(model: HeadModel, inputs: Sequence[str] | Sequence[Sequence[int]], heads: Sequence[Head],
                    beta: float = 0.4, tau: float = 0.1, min_share: float = 0.5,
                    progress: bool = True) -> InterventionPlan:
    """An ACT plan with calibrated sink sets (`InterventionPlan.act_with_sinks`) for `heads`.

    Each calibration input (a text, or token ids) is run once with the received attention
    measured in the patched attention; a head's sink set on it is the paper's ({j : r[j] > τ}
    minus its first element). A position is kept for the head when it is in that set on at least
    `min_share` of the inputs long enough to contain it — on a fixed prompt template (a system
    prompt, a few-shot header) the hidden sinks sit at the same positions on every input, which
    is what a deployment reuses. Heads with no position kept are left out of the plan.
    """
    if not 0.0 < min_share <= 1.0:
        raise HeadlabError(f"min_share must be in (0, 1], got {min_share}")
    if not inputs:
        raise HeadlabError("calibrate_sinks needs at least one calibration input")
    if not heads:
        raise HeadlabError("calibrate_sinks needs at least one head")
    for l, h in heads:
        model.spec.check_head(l, h, "ACT head")
    from headlab.stats import StatsRequest
    from headlab.kernels.reference import act_sink_sets

    layers = sorted({l for l, _ in heads})
    request = StatsRequest(received=True, layers=layers)
    adaptive = InterventionPlan().act(heads, beta=beta, tau=tau)
    hits: dict[Head, dict[int, int]] = {head: {} for head in heads}
    seen: dict[int, int] = {}  # position -> how many inputs are long enough to contain it
    for item in tqdm(inputs, desc="ACT sink calibration", disable=not progress):
        ids = model.tokenize(item)["input_ids"] if isinstance(item, str) else torch.tensor([list(item)])
        ids = ids.to(model.device)
        with model.patched(None, request) as rec, torch.no_grad():
            model(ids)
        K = ids.shape[1]
        for k in range(K):
            seen[k] = seen.get(k, 0) + 1
        received, count = rec.stats.received.float().cpu(), rec.stats.received_count.float().cpu()  # [L', 1, H, K]
        for i, layer in enumerate(rec.stats.layers):
            lp = adaptive.compile_layer(layer, model.spec.n_heads, model.spec.head_dim)
            sinks = act_sink_sets(received[i], count[i], lp)[0]  # [H, K]
            for l, h in heads:
                if l == layer:
                    for j in sinks[h].nonzero().flatten().tolist():
                        hits[(l, h)][j] = hits[(l, h)].get(j, 0) + 1
    kept = {head: [j for j, n in sorted(found.items()) if n >= min_share * seen[j]] for head, found in hits.items()}
    return InterventionPlan().act_with_sinks({head: pos for head, pos in kept.items() if pos}, beta=beta)


def evaluate(model: HeadModel, samples: Sequence[choice.ChoiceSample], plan: InterventionPlan,
             base_plan: InterventionPlan | None = None, batch_size: int = 32) -> dict:
    """Accuracy without (`base_plan`, default none) and with the ACT plan on held-out samples."""
    before = choice.accuracy(model, samples, base_plan, batch_size)
    after = choice.accuracy(model, samples, plan, batch_size)
    return {"n": len(samples), "accuracy_before": before, "accuracy_after": after}


@analysis("act", "intervene", summary="ACT: search the heads whose sink calibration helps, evaluate before/after.",
          paper="Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ACT) — METHODS.md: ACT",
          datasets="closed-choice questions: JSONL/CSV with prompt, choices, answer (--data); zoo models bring their own",
          writes=("act_gain", "act_loss_estimate", "plan", "summary"), files=("data",),
          choices={"method": METHODS},
          help={**choice.CHOICE_HELP, **COMMON_HELP, "beta": "sink attention scale (the paper's 0.4)",
                "tau": "hidden-sink threshold", "layers": "candidate layers (default 2..L-2)"}, modality="text")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None, n: int = 200,
        calibration_fraction: float = 0.5, beta: float = 0.4, tau: float = 0.1, layers: list[int] | None = None,
        seed: int = 0, method: str = "auto", screen: int = 32, draws: int = 3, progress: bool = True) -> Path:
    from dataclasses import asdict

    from headlab import jobs

    jobs.check_method(method, screen, "--screen")
    jobs.check_count(draws, "--draws", 0)
    config = ACTConfig(beta=beta, tau=tau, layers=layers or None)
    params = {"data": data, "n": n, "calibration_fraction": calibration_fraction, "seed": seed, **asdict(config),
              "method": method, "screen": screen, "draws": draws}
    cal, test = choice.job_splits(model, data, n, calibration_fraction, seed)
    with jobs.started(out, "act", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        result = search(hm, cal, config, progress=progress, cache=cache, method=method, screen=screen)
        evaluation = evaluate(hm, test, result.plan)
        candidates = [(l, h) for l in config.candidate_layers(hm.spec.n_layers) for h in range(hm.spec.n_heads)]
        controls, evaluation["accuracy_random"] = jobs.random_head_controls(
            cache, hm.spec.shape, result.heads, draws, seed, candidates,
            lambda heads: choice.accuracy(hm, test, InterventionPlan().act(heads, beta=beta, tau=tau)))
        evaluation["random_heads"] = [[list(h) for h in heads] for heads in controls]
        run.save_plan(result.plan)
        summary = {"heads": [list(h) for h in result.heads], "calibration_accuracy_before": result.baseline_accuracy,
                   "calibration_accuracy_after": result.calibrated_accuracy, "test": evaluation,
                   **jobs.search_summary(result.params)}
        scores = {"act_gain": result.gains}
        if result.loss_estimate is not None:
            scores["act_loss_estimate"] = result.loss_estimate
        return jobs.finish(run, summary, scores)
