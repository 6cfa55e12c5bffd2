"""ZeroTuning (Han et al. 2025, "Unlocking the Initial Token's Power"): head-wise calibration of
the attention paid to the first token.

Intervention (METHODS.md): for each chosen head, A'[i,0] = γ·A[i,0] / (1 + (γ−1)·A[i,0]) and the
other keys are renormalized — exactly a logit bias log γ on key 0 (`InterventionPlan.scale_first_token`),
applied inside the patched attention at every layer call and decode step.

Calibration — supervised, as the reference code does it (FeijiangHan/ZeroTuning,
`eval_classification_final.py`: each head, or head index across layers, is scaled by a rate and
scored by accuracy on a labelled calibration set, rates swept over a range). headlab runs the
paper's three steps on a calibration set of closed-choice samples (`analyses.choice`):
1. head profiling: every candidate head alone with γ_up (> 1) and with γ_down (< 1); its gain is the
   change of the objective against the unscaled model;
2. grouping: a head is up-effective when γ_up helps it more than γ_down and by more than
   `min_gain`, down-effective conversely; the group with the larger total gain is kept;
3. γ search: one γ for the kept group, swept over the `gammas` on that side of 1; the best (on a
   tie, the one closest to 1) is kept if it beats the unscaled model, otherwise the result is
   the identity plan.
Objective: "accuracy" (supervised; the reference) or "entropy" (unsupervised: the negative mean
entropy of the choice distribution, no labels used — the paper's label-free variant as headlab
reads it; the reference code ships only the supervised search).

    result = zerotuning.calibrate(model, choice.zoo_dataset("mcqa", 200))
    result.plan; result.profile_up.top(5); zerotuning.evaluate(model, test_samples, result.plan)
"""

from __future__ import annotations

from pathlib import Path
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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
class ZeroTuningConfig:
    gamma_up: float = 1.5
    gamma_down: float = 0.5
    gammas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.15, 1.3, 1.5, 2.0, 3.0, 5.0)
    objective: Literal["accuracy", "entropy"] = "accuracy"
    layers: Sequence[int] | None = None
    """Candidate layers (None: all)."""
    min_gain: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not (self.gamma_up > 1 and 0 < self.gamma_down < 1):
            raise HeadlabError(f"need gamma_up > 1 and 0 < gamma_down < 1, got {self.gamma_up}, {self.gamma_down}")
        if self.objective not in ("accuracy", "entropy"):
            raise HeadlabError(f"objective must be 'accuracy' (supervised) or 'entropy' (unsupervised), got {self.objective!r}")
        if any(g <= 0 for g in self.gammas):
            raise HeadlabError(f"every gamma must be > 0, got {self.gammas}")


@dataclass
class ZeroTuningResult:
    plan: InterventionPlan
    """The calibrated scaling (added to `base_plan` when one was given); empty when nothing helped."""
    heads: list[Head]
    gamma: float
    direction: str
    """'up', 'down' or 'none'."""
    baseline: float
    calibrated: float
    """Objective on the calibration set before / after."""
    profile_up: HeadScores
    profile_down: HeadScores
    """Per head: objective gain with γ_up / γ_down alone."""
    sweep: Any
    """DataFrame: gamma, objective for the kept group."""
    params: dict = field(default_factory=dict)
    loss_estimates: dict[str, HeadScores] = field(default_factory=dict)
    """method="atp": "up" / "down" → each head's estimated task-loss change with γ_up / γ_down alone."""


def _objective(model: HeadModel, samples: Sequence[choice.ChoiceSample], plan: InterventionPlan | None,
               config: ZeroTuningConfig, cache: MutableMapping[str, Any] | None, key: str) -> float:
    def compute() -> float:
        ev = choice.evaluate(model, samples, plan, config.batch_size)
        return ev.accuracy if config.objective == "accuracy" else -ev.entropy

    return cached(cache, f"{config.objective}|{key}", compute)


def calibrate(model: HeadModel, samples: Sequence[choice.ChoiceSample], config: ZeroTuningConfig = ZeroTuningConfig(),
              base_plan: InterventionPlan | None = None, progress: bool = True,
              cache: MutableMapping[str, Any] | None = None, method: str = "exact", screen: int = 32) -> ZeroTuningResult:
    """Profile heads, group them, search γ; returns the plan and everything measured on the way.

    `cache` (e.g. a run's `Checkpoint`) keeps every evaluation: a resumed search skips them.
    method="atp" screens the profiling step: attribution estimates of every head's effect on the
    task loss with γ_up and with γ_down (`choice.loss_attribution`), then only the `screen` heads
    with the largest estimated decrease (either γ) are profiled exactly; the others stay
    unmeasured (count 0) and out of the groups. "auto": atp from `attribution.AUTO_ATP_HEADS` heads up.
    """
    import pandas as pd

    samples = choice.build_dataset(samples=samples)
    base_plan = base_plan if base_plan is not None else InterventionPlan()
    L, H = model.spec.shape
    layers = list(range(L)) if config.layers is None else list(config.layers)
    for layer in layers:
        model.spec.check_head(layer, 0, "candidate layer")
    heads = [(l, h) for l in layers for h in range(H)]
    method = attribution.resolve_method(method, len(heads))
    estimates: dict[str, torch.Tensor] = {}
    if method == "atp":
        if not base_plan.is_empty():
            raise HeadlabError("method='atp' screens the unmodified model; with a base_plan use method='exact'")
        if screen < 1:
            raise HeadlabError(f"screen must be >= 1 (how many heads to profile exactly), got {screen}")
        for side, gamma in (("up", config.gamma_up), ("down", config.gamma_down)):
            ablation = InterventionPlan().scale_first_token({h: gamma for h in heads})
            estimates[side] = torch.tensor(cached(cache, f"atp-loss*{gamma}", lambda a=ablation: choice.loss_attribution(
                model, samples, a, config.batch_size).mean(0).tolist()), dtype=torch.float64)
        best_decrease = torch.maximum(-estimates["up"], -estimates["down"])
        heads = attribution.top_heads(best_decrease, heads, screen)
    base = _objective(model, samples, base_plan, config, cache, "base")
    up = torch.zeros(L, H, dtype=torch.float64)
    down = torch.zeros(L, H, dtype=torch.float64)
    measured = torch.ones(L, H, dtype=torch.float64) if method == "exact" else torch.zeros(L, H, dtype=torch.float64)
    for head in tqdm(heads, desc="zerotuning profile", disable=not progress):
        l, h = head
        measured[head] = 1.0
        up[head] = _objective(model, samples, base_plan + InterventionPlan().scale_first_token({head: config.gamma_up}), config,
                              cache, f"L{l}H{h}*{config.gamma_up}") - base
        down[head] = _objective(model, samples, base_plan + InterventionPlan().scale_first_token({head: config.gamma_down}), config,
                                cache, f"L{l}H{h}*{config.gamma_down}") - base
    ups = [h for h in heads if up[h] > config.min_gain and up[h] >= down[h]]
    downs = [h for h in heads if down[h] > config.min_gain and down[h] > up[h]]
    gain_up, gain_down = float(sum(up[h] for h in ups)), float(sum(down[h] for h in downs))
    direction, group = ("up", ups) if gain_up >= gain_down else ("down", downs)
    info: dict[str, Any] = {"objective": config.objective, "n": len(samples), "method": method}
    if method == "atp":
        info["screen"] = screen
    common = dict(model=model.name, params=info)
    result = dict(profile_up=HeadScores.from_tensor(up, "zerotuning_gain_up", counts=measured, **common),
                  profile_down=HeadScores.from_tensor(down, "zerotuning_gain_down", counts=measured, **common),
                  params={"gamma_up": config.gamma_up, "gamma_down": config.gamma_down, **info},
                  loss_estimates={side: HeadScores.from_tensor(v, f"zerotuning_loss_estimate_{side}", **common)
                                  for side, v in estimates.items()})
    if not group:
        return ZeroTuningResult(plan=base_plan, heads=[], gamma=1.0, direction="none", baseline=base, calibrated=base,
                                sweep=pd.DataFrame(columns=["gamma", "objective"]), **result)
    side = [g for g in config.gammas if (g > 1 if direction == "up" else g < 1)]
    rows = []
    for g in tqdm(side, desc="zerotuning gamma", disable=not progress):
        plan = base_plan + InterventionPlan().scale_first_token({h: g for h in group})
        rows.append({"gamma": g, "objective": _objective(model, samples, plan, config, cache, f"{direction}-group*{g}")})
    best = max(rows, key=lambda r: (r["objective"], -abs(math.log(r["gamma"]))))  # ties: the mildest γ
    if best["objective"] <= base:
        return ZeroTuningResult(plan=base_plan, heads=[], gamma=1.0, direction="none", baseline=base, calibrated=base,
                                sweep=pd.DataFrame(rows), **result)
    plan = base_plan + InterventionPlan().scale_first_token({h: best["gamma"] for h in group})
    return ZeroTuningResult(plan=plan, heads=group, gamma=best["gamma"], direction=direction, baseline=base,
                            calibrated=best["objective"], sweep=pd.DataFrame(rows), **result)


def evaluate(model: HeadModel, samples: Sequence[choice.ChoiceSample], plan: InterventionPlan,
             base_plan: InterventionPlan | None = None, batch_size: int = 32) -> dict:
    """Accuracy and choice entropy before (`base_plan`, default none) and after (`plan`)."""
    before = choice.evaluate(model, samples, base_plan, batch_size)
    after = choice.evaluate(model, samples, plan, batch_size)
    return {"n": len(samples), "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
            "entropy_before": before.entropy, "entropy_after": after.entropy}


@analysis("zerotuning", "intervene",
          summary="ZeroTuning: profile heads, pick the group and gamma on the calibration split, evaluate before/after.",
          paper="ZeroTuning (head-wise first-token attention scaling) — METHODS.md: ZeroTuning",
          datasets="closed-choice questions: JSONL/CSV with prompt, choices, answer (--data); zoo models bring their own",
          writes=("gain_up", "gain_down", "gamma_sweep", "plan", "summary"), files=("data",),
          choices={"objective": ("accuracy", "entropy"), "method": METHODS},
          help={**choice.CHOICE_HELP, **COMMON_HELP, "objective": "accuracy (supervised) | entropy (unsupervised)",
                "layers": "candidate layers (default all)"}, modality="text")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        n: int = 200, calibration_fraction: float = 0.5, objective: str = "accuracy", layers: list[int] | None = None,
        seed: int = 0, method: str = "auto", screen: int = 32, draws: int = 3, progress: bool = True) -> Path:
    from dataclasses import asdict

    from headlab import jobs

    jobs.check_method(method, screen, "--screen")
    jobs.check_count(draws, "--draws", 0)
    config = ZeroTuningConfig(objective=objective, layers=layers or None)  # type: ignore[arg-type]
    params = {"data": data, "n": n, "calibration_fraction": calibration_fraction, "seed": seed, **asdict(config),
              "method": method, "screen": screen, "draws": draws}
    cal, test = choice.job_splits(model, data, n, calibration_fraction, seed)
    with jobs.started(out, "zerotuning", model, params, run_id) as (run, hm):
        cache = jobs.checkpoint(run)
        result = calibrate(hm, cal, config, progress=progress, cache=cache, method=method, screen=screen)
        evaluation = evaluate(hm, test, result.plan)
        L, H = hm.spec.shape
        candidates = [(l, h) for l in (range(L) if config.layers is None else config.layers) for h in range(H)]

        def control(heads: list) -> dict:
            ev = choice.evaluate(hm, test, InterventionPlan().scale_first_token({h: result.gamma for h in heads}),
                                 config.batch_size)
            return {"accuracy": ev.accuracy, "entropy": ev.entropy}

        controls, randoms = jobs.random_head_controls(cache, hm.spec.shape, result.heads, draws, seed, candidates,
                                                      control)
        evaluation["accuracy_random"] = [r["accuracy"] for r in randoms]
        evaluation["entropy_random"] = [r["entropy"] for r in randoms]
        evaluation["random_heads"] = [[list(h) for h in heads] for heads in controls]
        run.save_plan(result.plan)
        summary = {"heads": [list(h) for h in result.heads], "gamma": result.gamma, "direction": result.direction,
                   "calibration_objective_before": result.baseline, "calibration_objective_after": result.calibrated,
                   "test": evaluation, **jobs.search_summary(result.params)}
        run.save_samples(result.sweep, "gamma_sweep")
        scores = {"gain_up": result.profile_up, "gain_down": result.profile_down}
        scores.update({f"loss_estimate_{side}": est for side, est in result.loss_estimates.items()})
        return jobs.finish(run, summary, scores)
