"""Linear probes on head outputs, and steering along them — Inference-Time Intervention (Li et al.,
NeurIPS 2023; METHODS.md "Probes on head outputs").

- Collect each head's output z (before o_proj) at one token of each labelled input, through the
  patched attention (`StatsRequest(head_outputs=True)` on that query only; no hooks).
- Per head, a scikit-learn logistic-regression probe, scored by stratified k-fold
  cross-validation: validation accuracy and AUROC (out-of-fold probabilities), and the mean
  out-of-fold log-probability of the true label — HeadScores ranked like every other analysis.
  Accuracy saturates (many heads separate an easy property perfectly); the log-likelihood, on raw
  (unstandardized) z with an L2-regularized probe, also rewards a label carried by large-magnitude
  directions of z — the ones a shift along θ acts on — and separates such ties.
- Per head, the probe direction θ (the probe refit on all inputs, its weight vector normalized)
  and σ, the std of z along θ; ITI's alternative, the mass-mean direction (mean z of the positive
  class minus the negative class, normalized), is kept too.
- `shift_plan(result, heads, alpha)`: ITI's intervention z ← z + α·σ·θ on chosen heads
  (`InterventionPlan.shift_heads`), applied in every patched forward — α < 0 pushes against the
  property.

Labels are binary (ITI's probes are): two distinct labels, the `positive` one (default: the second
in sorted order) as class 1. One class, a third class or an unknown `positive` label is an error
naming the labels found. Named difference: ITI's probes use a held-out validation split of one fit;
here k-fold cross-validation gives every input an out-of-fold prediction (less variance on small
sets); `folds=None` would be the same idea with one split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, MutableMapping, Sequence

import torch
from tqdm.auto import tqdm

from headlab.checkpoint import cached
from headlab.datasets import records_to, text_field
from headlab.errors import HeadlabError
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.plan import InterventionPlan
from headlab.scores import HeadScores
from headlab.stats import StatsRequest

Head = tuple[int, int]


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    image: Any = None
    """An image (HxWx3 array, PIL) for a vision-language model; the text then holds its placeholder."""


@dataclass(frozen=True)
class ProbeConfig:
    position: int = -1
    """Token whose head outputs are probed (Python indexing into the input: -1 is the last token)."""
    folds: int = 5
    """Stratified cross-validation folds (at most the size of the smaller class)."""
    C: float = 1.0
    """Inverse L2 regularization of the logistic regression."""
    positive: str | None = None
    """The label that is class 1 (default: the second label in sorted order)."""
    seed: int = 0


def build_dataset(path: str | Path | None = None, samples: Sequence[tuple[str, Any]] | None = None) -> list[LabelledText]:
    """Labelled inputs from a JSONL/CSV file with `text` and `label` columns, or (text, label) pairs."""
    if path is not None:
        return records_to(path, lambda r: LabelledText(text_field(r, "text"), _label(r["label"])))
    out = [LabelledText(t, _label(lab)) for t, lab in samples or []]
    if not out:
        raise HeadlabError("the probes analysis needs labelled inputs: a JSONL/CSV with text and label, or (text, label) pairs")
    return out


def _label(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"'label' must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def classes(samples: Sequence[LabelledText], positive: str | None = None) -> tuple[str, str]:
    """(negative, positive) labels, checked: exactly two, `positive` among them."""
    found = sorted({s.label for s in samples})
    if len(found) != 2:
        raise HeadlabError(f"probes are binary: the inputs need exactly two labels, found {len(found)}: {found[:10]}")
    if positive is not None and positive not in found:
        raise HeadlabError(f"positive label {positive!r} is not among the labels found: {found}")
    pos = positive or found[1]
    return (found[0] if pos == found[1] else found[1]), pos


def head_outputs(model: HeadModel, text: str, position: int = -1, image: Any = None) -> torch.Tensor:
    """[L, H, Dv] every head's output z at one token of `text` (with `image`, through the model's
    processor), through the patched attention."""
    if image is not None:
        from headlab.vision import encode

        inputs = encode(model, text, image)
    else:
        inputs = model.tokenize(text)
    n = inputs["input_ids"].shape[1]
    if not -n <= position < n:
        raise HeadlabError(f"position {position} is outside an input of {n} tokens")
    with model.patched(None, StatsRequest(head_outputs=True, queries=[position % n])) as rec, torch.no_grad():
        model(**inputs)
    return rec.stats.head_outputs[:, 0, :, 0].float().cpu()


def image_presence_samples(n: int = 24, seed: int = 0) -> list[LabelledText]:
    """The toy VLM's questions (`zoo:shapes-llava`), each once with its image ("image") and once with
    the same scene emptied of its shape ("blank") — which heads' outputs know whether there is
    something to see."""
    import random

    from headlab.zoo import shapes
    from headlab.zoo.shapes_eval import blank

    rng = random.Random(seed)
    out = []
    for kind in ("color", "shape"):
        for ex in shapes.held_out(kind, n // 2, seed=70_000 + seed):
            out.append(LabelledText(ex.prompt, "image", ex.scene.array(rng)))
            out.append(LabelledText(ex.prompt, "blank", blank(ex).scene.array(rng)))
    return out


@dataclass
class ProbeResult:
    accuracy: HeadScores
    """Cross-validated accuracy of each head's probe."""
    auroc: HeadScores
    log_likelihood: HeadScores
    """Mean out-of-fold log-probability of the true label (0 is perfect; log 0.5 is chance)."""
    directions: torch.Tensor
    """[L, H, Dv] unit probe directions θ (toward the positive class)."""
    sigma: torch.Tensor
    """[L, H] std of z along θ over the inputs."""
    mass_mean: torch.Tensor
    """[L, H, Dv] unit mass-mean directions (positive mean − negative mean)."""
    labels: tuple[str, str]
    """(negative, positive)."""
    outputs: torch.Tensor = field(repr=False)
    """[n, L, H, Dv] the probed head outputs."""
    y: torch.Tensor = field(repr=False)
    """[n] 0/1 labels."""


def score(model: HeadModel, samples: Sequence[LabelledText], config: ProbeConfig = ProbeConfig(), progress: bool = True,
          cache: MutableMapping[str, Any] | None = None) -> ProbeResult:
    """Probe every head's output for the binary label of `samples` (see the module docstring)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    negative, positive = classes(samples, config.positive)
    y = np.array([int(s.label == positive) for s in samples])
    folds = min(config.folds, int(np.bincount(y).min()))
    if folds < 2:
        raise HeadlabError(f"cross-validation needs at least 2 inputs of each label; label counts: "
                           f"{negative}: {int((y == 0).sum())}, {positive}: {int((y == 1).sum())}")
    z = torch.stack([torch.tensor(cached(cache, f"z{i}",
                                         lambda s=s: head_outputs(model, s.text, config.position, s.image).tolist()))
                     for i, s in enumerate(tqdm(samples, desc="probes: head outputs", disable=not progress))])
    n, L, H, D = z.shape
    acc, auc, ll = (torch.zeros(L, H, dtype=torch.float64) for _ in range(3))
    directions, mass_mean, sigma = torch.zeros(L, H, D), torch.zeros(L, H, D), torch.zeros(L, H)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    for l in range(L):
        for h in range(H):
            X = z[:, l, h].double().numpy()
            probe = LogisticRegression(C=config.C, max_iter=2000)
            p = cross_val_predict(probe, X, y, cv=splitter, method="predict_proba")[:, 1]
            acc[l, h] = float(((p > 0.5) == y).mean())
            auc[l, h] = float(roc_auc_score(y, p))
            ll[l, h] = float(np.log(np.clip(np.where(y == 1, p, 1 - p), 1e-12, None)).mean())
            w = torch.tensor(probe.fit(X, y).coef_[0], dtype=torch.float32)
            directions[l, h] = w / w.norm().clamp_min(1e-12)
            sigma[l, h] = (z[:, l, h] @ directions[l, h]).std()
            diff = z[y == 1, l, h].mean(0) - z[y == 0, l, h].mean(0)
            mass_mean[l, h] = diff / diff.norm().clamp_min(1e-12)
    params = {"position": config.position, "folds": folds, "C": config.C, "labels": [negative, positive], "n": n}
    counts = torch.full((L, H), float(n), dtype=torch.float64)
    return ProbeResult(accuracy=HeadScores(sums=acc * n, counts=counts, analysis="probe_accuracy", model=model.name, params=params),
                       auroc=HeadScores(sums=auc * n, counts=counts, analysis="probe_auroc", model=model.name, params=params),
                       log_likelihood=HeadScores(sums=ll * n, counts=counts, analysis="probe_log_likelihood",
                                                 model=model.name, params=params),
                       directions=directions, sigma=sigma, mass_mean=mass_mean, labels=(negative, positive),
                       outputs=z, y=torch.tensor(y))


def shift_plan(result: ProbeResult, heads: Sequence[Head], alpha: float,
               direction: Literal["probe", "mass_mean"] = "probe") -> InterventionPlan:
    """ITI on `heads`: z ← z + α·σ·θ (θ the probe or mass-mean direction, toward the positive label;
    α < 0 pushes toward the negative one). σ is the std of z along the probe direction."""
    if direction not in ("probe", "mass_mean"):
        raise HeadlabError(f"direction must be 'probe' or 'mass_mean', got {direction!r}")
    theta = result.directions if direction == "probe" else result.mass_mean
    return InterventionPlan().shift_heads({(l, h): alpha * float(result.sigma[l, h]) * theta[l, h] for l, h in heads})


@analysis("probes", "score",
          summary="Linear probes on head outputs (ITI, Li et al. 2023): per-head accuracy / AUROC, probe directions saved.",
          paper="Li et al. 2023, Inference-Time Intervention — METHODS.md: probes",
          datasets="JSONL/CSV with text and label (two labels); zoo models trained on refusal (refuse / comply) and "
                   "zoo:shapes-llava (image / no image) bring their own",
          writes=("probe_accuracy", "probe_auroc", "probe_log_likelihood", "probe_directions", "summary"),
          files=("data",),
          help={"data": "JSONL/CSV with text and label (two labels)",
                "n": "zoo prompts per label when no --data (zoo models trained on refusal)",
                "position": "token whose head outputs are probed (-1: the last)",
                "folds": "stratified cross-validation folds",
                "positive": "the label that is class 1 (default: the second, sorted)", "seed": "seed of the folds"})
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        n: int = 48, position: int = -1, folds: int = 5, positive: str | None = None, seed: int = 0,
        progress: bool = True) -> Path:
    """Linear probes on every head's output (ITI): which heads encode a binary label; probe directions saved."""
    from headlab import jobs

    params = {"data": data, "n": n, "position": position, "folds": folds, "positive": positive, "seed": seed}
    jobs.check_count(folds, "--folds", 2)
    if data:
        samples = build_dataset(path=data)
    elif jobs.zoo_task(model, "refusal"):
        from headlab.analyses import safety

        jobs.check_count(n, "--n", 2)
        samples = build_dataset(samples=[(p, "refuse") for p in safety.zoo_dataset(n, True)]
                                + [(p, "comply") for p in safety.zoo_dataset(n, False)])
        positive = positive or "refuse"
    elif model == "zoo:shapes-llava":  # each question with its image and with the scene emptied
        jobs.check_count(n, "--n", 2)
        samples = image_presence_samples(n, seed)
        positive = positive or "image"
    else:
        raise HeadlabError(f"give --data (JSONL/CSV with text and label columns) for {model}")
    classes(samples, positive)  # two labels, a known positive one: checked before the model loads
    config = ProbeConfig(position=position, folds=folds, positive=positive, seed=seed)
    with jobs.started(out, "probes", model, params, run_id) as (run, hm):
        result = score(hm, samples, config, progress=progress, cache=jobs.checkpoint(run))
        run.save_tensors({"directions": result.directions, "sigma": result.sigma, "mass_mean": result.mass_mean},
                         "probe_directions", {"labels": list(result.labels), "position": position})
        run.save_examples([{"text": s.text, "label": s.label, "image": s.image} for s in samples])
        summary = {"inputs": len(samples), "labels": {"negative": result.labels[0], "positive": result.labels[1]},
                   "top_accuracy": [[l, h, s] for l, h, s in result.accuracy.top(10)],
                   "top_log_likelihood": [[l, h, s] for l, h, s in result.log_likelihood.top(10)]}
        return jobs.finish(run, summary, {"probe_accuracy": result.accuracy, "probe_auroc": result.auroc,
                                          "probe_log_likelihood": result.log_likelihood})
