"""Baseline vs patched on one prompt: next-token distribution change and greedy text, side by side.

    result = compare_plan(model, "prompt ...", plan, max_new_tokens=16, top_k=10)
    result.kl                  # KL(patched || baseline) of the next token, nats
    result.changes             # per token of either top-k: p_baseline, p_patched, delta
    result.baseline_text, result.patched_text

What the app's playground and a notebook both call; `progress(fraction, message)` is told how
far the work is, and `should_stop()` (when given) is polled between decode steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan

Progress = Callable[[float, str], None]


class Cancelled(HeadlabError):
    """The caller asked the work to stop."""


@dataclass
class PlanComparison:
    prompt: str
    plan: dict[str, Any]
    kl: float
    """KL(patched || baseline) of the next-token distribution, in nats."""
    baseline_top: list[tuple[str, float]]
    patched_top: list[tuple[str, float]]
    changes: list[dict[str, Any]] = field(default_factory=list)
    """Tokens in either top-k: token, p_baseline, p_patched, delta (patched − baseline), by |delta|."""
    baseline_text: str = ""
    patched_text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_text(model: HeadModel, token_id: int) -> str:
    return model.text_tokenizer.decode([token_id])


def _generate(model: HeadModel, ids: torch.Tensor, plan: InterventionPlan | None, max_new_tokens: int,
              on_step: Callable[[], None]) -> str:
    from transformers import StoppingCriteria, StoppingCriteriaList

    from headlab.generate import _pad_id

    class _Step(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            on_step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with model.patched(plan):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=_pad_id(model), stopping_criteria=StoppingCriteriaList([_Step()]))
    return model.text_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def compare_plan(model: HeadModel, prompt: str, plan: InterventionPlan, *, max_new_tokens: int = 16, top_k: int = 10,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> PlanComparison:
    """Run `prompt` without and with `plan`: next-token top-k of both, their KL, and greedy continuations."""
    if model.tokenizer is None:
        raise HeadlabError(f"{model.name} has no tokenizer: the playground needs text prompts")
    if not isinstance(prompt, str) or not prompt.strip():
        raise HeadlabError("the prompt is empty: type a prompt")
    if not 0 <= max_new_tokens <= 512:
        raise HeadlabError(f"max_new_tokens must be in 0..512, got {max_new_tokens}")
    if top_k < 1:
        raise HeadlabError(f"top_k must be >= 1, got {top_k}")
    plan = plan.for_model(model.spec)
    total = 2 + 2 * max_new_tokens
    done = 0

    def step(message: str) -> None:
        nonlocal done
        if should_stop is not None and should_stop():
            raise Cancelled("stopped")
        done += 1
        if progress is not None:
            progress(min(done / total, 1.0), message)

    ids = model.tokenize(prompt)["input_ids"]
    with model.patched(None):
        base = model(ids).logits[0, -1].float().log_softmax(-1)
    step("baseline forward")
    with model.patched(plan):
        patched = model(ids).logits[0, -1].float().log_softmax(-1)
    step("patched forward")
    kl = float(torch.sum(patched.exp() * (patched - base)))
    k = min(top_k, base.numel())
    pb, pp = base.exp().cpu(), patched.exp().cpu()
    top_b, top_p = torch.topk(pb, k).indices.tolist(), torch.topk(pp, k).indices.tolist()
    changes = [{"token": _token_text(model, t), "p_baseline": float(pb[t]), "p_patched": float(pp[t]),
                "delta": float(pp[t] - pb[t])} for t in dict.fromkeys(top_b + top_p)]
    changes.sort(key=lambda r: -abs(r["delta"]))
    texts = ["", ""]
    if max_new_tokens:
        texts[0] = _generate(model, ids, None, max_new_tokens, lambda: step("baseline generation"))
        texts[1] = _generate(model, ids, plan, max_new_tokens, lambda: step("patched generation"))
    if progress is not None:
        progress(1.0, "done")
    return PlanComparison(
        prompt=prompt, plan=plan.to_dict(), kl=kl,
        baseline_top=[(_token_text(model, t), float(pb[t])) for t in top_b],
        patched_top=[(_token_text(model, t), float(pp[t])) for t in top_p],
        changes=changes, baseline_text=texts[0], patched_text=texts[1],
    )


__all__ = ["Cancelled", "PlanComparison", "compare_plan"]
