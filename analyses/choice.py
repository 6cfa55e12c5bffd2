"""Closed-choice evaluation: classification and multiple-choice accuracy from next-token logits.

The evaluation behind ACT's head search and ZeroTuning's calibration (both papers score
classification / multiple-choice sets this way): the prompt ends where the answer starts, and the
prediction is the choice whose first token has the highest next-token logit. Prompts are
batched with right padding, so key 0 is every row's first token (ZeroTuning scales key 0).

    samples = choice.zoo_dataset("mcqa", 200)
    choice.accuracy(model, samples, plan)      # under an InterventionPlan
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headlab.datasets import records_to, text_field
from headlab.errors import HeadlabError
from headlab.model import HeadModel
from headlab.plan import InterventionPlan


@dataclass(frozen=True)
class ChoiceSample:
    """A prompt, the candidate answers (continuations of the prompt) and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a closed-choice sample needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is outside the {len(self.choices)} choices (0-based)")


def _from_record(record: dict[str, Any]) -> ChoiceSample:
    prompt = text_field(record, "prompt")
    choices = record["choices"]
    if isinstance(choices, str):
        choices = [c.strip() for c in choices.split("|")]
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"'choices' must be a list of non-empty strings (in CSV: 'yes | no'), got {choices!r}")
    answer = record["answer"]
    if isinstance(answer, str):
        answer = int(answer) if answer.strip().isdigit() else (choices.index(answer.strip()) if answer.strip() in choices else None)
        if answer is None:
            raise ValueError(f"'answer' {record['answer']!r} is neither a 0-based index nor one of the choices {choices}")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise ValueError(f"'answer' must be a 0-based index or one of the choices, got {answer!r}")
    return ChoiceSample(prompt, tuple(choices), answer)


def build_dataset(path: str | Path | None = None, samples: Sequence[ChoiceSample] | None = None) -> list[ChoiceSample]:
    """Samples from a list or a file: JSONL {"prompt", "choices": [...], "answer": index or choice}
    or CSV with columns prompt, choices ("yes | no"), answer."""
    if path is not None:
        return records_to(path, _from_record)
    if not samples:
        raise HeadlabError("a closed-choice evaluation needs samples: pass `samples` or a dataset `path`")
    return list(samples)


def zoo_dataset(task: str, n: int, seed: int = 30_000) -> list[ChoiceSample]:
    """Zoo tasks with a closed answer set: 'mcqa' (the labels) and 'refusal' (sure / sorry)."""
    from headlab.zoo import tasks

    if task == "mcqa":
        return [ChoiceSample(ex.prompt, tuple(tasks.LABEL_SETS[ex.meta["label_set"]]), ex.meta["correct"])
                for ex in tasks.held_out("mcqa", n, seed=seed)]
    if task == "refusal":
        return [ChoiceSample(ex.prompt, ("sure", "sorry"), int(ex.answer.startswith("sorry")))
                for ex in tasks.held_out("refusal", n, seed=seed)]
    raise HeadlabError(f"zoo task {task!r} has no closed answer set; use 'mcqa' or 'refusal'")


@functools.lru_cache(maxsize=4096)
def _encode(tokenizer: Any, prompt: str, continuations: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt ids, first token of each continuation): memoized, since a head search scores the
    same samples once per candidate head and tokenization never changes between those passes."""
    base = tokenizer(prompt)["input_ids"]
    ids = []
    for c in continuations:
        full = tokenizer(prompt + " " + c)["input_ids"]
        ids.append(full[len(base)] if full[: len(base)] == base and len(full) > len(base) else full[-1])
    if len(set(ids)) != len(ids):
        raise HeadlabError(f"{list(continuations)} share their first token; scoring them by next-token logits needs distinct ones")
    return tuple(base), tuple(ids)


def continuation_token_ids(model: HeadModel, prompt: str, continuations: Sequence[str]) -> list[int]:
    """The first token the model would emit for each continuation (" A" after "Answer:"), all distinct."""
    return list(_encode(model.text_tokenizer, prompt, tuple(continuations))[1])


def _batches(model: HeadModel, samples: Sequence[ChoiceSample], batch_size: int) -> Iterator[tuple[int, Any, list, Any, Any]]:
    """(first index, samples, their (prompt ids, choice ids), input_ids [B, T], attention_mask [B, T])
    per batch, right-padded: each prompt's last token sits at len(prompt ids) − 1."""
    from headlab.generate import right_padded

    tok = model.text_tokenizer
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        encoded = [_encode(tok, s.prompt, s.choices) for s in chunk]
        ids, mask, _ = right_padded(model, [prompt_ids for prompt_ids, _ in encoded])
        yield i, chunk, encoded, ids, mask


def _picked(logits: torch.Tensor, encoded: list) -> list[torch.Tensor]:
    """Per row, the next-token logits [C] of its choices' first tokens (fp32)."""
    return [logits[j, len(prompt_ids) - 1, list(choice_ids)].float() for j, (prompt_ids, choice_ids) in enumerate(encoded)]


def choice_logits(model: HeadModel, samples: Sequence[ChoiceSample], plan: InterventionPlan | None = None,
                  batch_size: int = 32) -> list[torch.Tensor]:
    """Per sample, the next-token logits [C] of its choices' first tokens, under `plan`."""
    out: list[torch.Tensor] = []
    for _, _, encoded, ids, mask in _batches(model, samples, batch_size):
        with model.patched(plan):
            logits = model(ids, attention_mask=mask).logits
        out += [row.cpu() for row in _picked(logits, encoded)]
    return out


@dataclass
class ChoiceEval:
    accuracy: float
    entropy: float
    """Mean entropy (nats) of the softmax over each sample's choice logits (the unsupervised signal)."""
    predictions: list[int]


def evaluate(model: HeadModel, samples: Sequence[ChoiceSample], plan: InterventionPlan | None = None,
             batch_size: int = 32) -> ChoiceEval:
    """Accuracy and mean choice entropy under `plan`."""
    logits = choice_logits(model, samples, plan, batch_size)
    preds = [int(l.argmax()) for l in logits]
    ent = [float(torch.special.entr(torch.softmax(l, -1)).sum()) for l in logits]
    return ChoiceEval(accuracy=sum(p == s.answer for p, s in zip(preds, samples)) / len(samples),
                      entropy=sum(ent) / len(ent), predictions=preds)


def accuracy(model: HeadModel, samples: Sequence[ChoiceSample], plan: InterventionPlan | None = None, batch_size: int = 32) -> float:
    return evaluate(model, samples, plan, batch_size).accuracy


def loss_attribution(model: HeadModel, samples: Sequence[ChoiceSample], ablation: InterventionPlan,
                     batch_size: int = 32) -> torch.Tensor:
    """[N, L, H] attribution estimate (`headlab.attribution`) of how much each head's change under
    `ablation` (applied to that head alone) changes each sample's task loss — the cross-entropy of
    the right choice among the choices' first-token logits. Negative: the change helps. The screen
    of ACT's and ZeroTuning's head searches (accuracy has no gradient; this loss does)."""
    from headlab.attribution import attribute

    L, H = model.spec.shape
    out = torch.zeros(len(samples), L, H, dtype=torch.float64)
    for i, chunk, encoded, ids, mask in _batches(model, samples, batch_size):
        def loss(result: Any, encoded=encoded, chunk=chunk) -> torch.Tensor:
            return torch.stack([-torch.log_softmax(row, -1)[s.answer] for row, s in zip(_picked(result.logits, encoded), chunk)])

        out[i : i + len(chunk)] = attribute(model, {"input_ids": ids, "attention_mask": mask}, loss, ablation).values[0]
    return out


def job_splits(model: str, data: str | None, n: int, calibration_fraction: float,
               seed: int) -> tuple[list[ChoiceSample], list[ChoiceSample]]:
    """(calibration, test) samples of a closed-choice intervention job: the user's file, the zoo
    task models' multiple-choice task, or the real-text model's bracket task; seeded split."""
    from headlab import jobs
    from headlab.analyses import select_copy

    jobs.check_fraction(calibration_fraction)
    jobs.check_count(n, "--n", 2)
    if data:
        samples = build_dataset(path=data)
    elif jobs.is_zoo_task_model(model):
        samples = zoo_dataset("mcqa", n)
    elif jobs.is_corpus_model(model):
        from headlab.analyses import code_tasks

        samples = code_tasks.bracket_choices(None, n)
    else:
        raise HeadlabError(f"give --data (JSONL/CSV of prompt, choices, answer) for {model}")
    cal, test = select_copy.split(len(samples), calibration_fraction, seed)
    return [samples[i] for i in cal], [samples[i] for i in test]


CHOICE_HELP = {"data": "JSONL/CSV with prompt, choices, answer", "n": "zoo samples when no --data",
               "draws": "random head sets of the same size (the control)"}
"""Help of the closed-choice interventions' own options."""
