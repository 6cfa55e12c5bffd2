"""Select-and-copy heads (Tulchinskii et al. 2024, "Listening to the Wise Few").

Definition (METHODS.md; paper arXiv 2410.02343): a multiple-choice prompt lists options, each
introduced by a label ("A.", "B.", …), and ends with "Answer:". For head (l, h) the query is the
last prompt token; the keys are one token per option. The head's
- QK-score of option o is q_last · k_o — the pre-softmax attention logit (after RoPE, times the
  model's scaling, after softcap; no mask, no intervention bias), read inside the patched
  attention (`StatsRequest(keys=...)`);
- attention-score of option o is A[h, last, k_o].
The head's prediction is the argmax over options. Select-and-copy heads are the heads whose
prediction accuracy on a validation split is highest; the best is evaluated on a test split
against the model's own answer: the argmax of the label tokens' next-token logits.

Which key token (METHODS.md asked to verify): the paper reads the option's *end-of-line* token
(the "\\n" that closes each option line), where the option's meaning has been aggregated; its
label token is the alternative it compares with. `key_token="end"` (the default) takes the token
that covers the last character of each rendered option (its "\\n" when the format ends options
with a newline — `PAPER_FORMAT` does; the option's last word otherwise); `key_token="label"`
takes the label token. Few-shot prompts put k solved examples first; only the last question's
options are scored.
"""

from __future__ import annotations

import random
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from headlab.analyses import choice
from headlab.checkpoint import cached
from headlab.datasets import records_to, text_field
from headlab.errors import HeadlabError
from headlab.registry import analysis
from headlab.model import HeadModel
from headlab.scores import HeadScores
from headlab.stats import StatsRequest

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "letters": tuple("ABCDEFGHIJ"),
    "digits": tuple("123456789"),
    "lower": tuple("abcdefghij"),
}


@dataclass(frozen=True)
class MCQAFormat:
    """How a question and its options are rendered. `{question}`, `{label}`, `{option}` are filled in."""

    question: str = "Question: {question}\nOptions:\n"
    option: str = "{label}. {option}\n"
    answer: str = "Answer:"
    shot_answer: str = " {label}\n\n"
    """Appended after `answer` in few-shot examples (the solved label, then a blank line)."""


PAPER_FORMAT = MCQAFormat()
ZOO_FORMAT = MCQAFormat(question="question : {question}", option=" {label} ) {option}", answer=" answer :",
                        shot_answer=" {label} ")
"""The zoo models' training format: `question : which is a fruit ? a ) saw b ) lemon ... answer :`."""


@dataclass(frozen=True)
class SelectCopyConfig:
    """Parameters, with the paper's defaults."""

    labels: str | tuple[str, ...] = "letters"
    """A LABEL_SETS name or the labels themselves."""
    key_token: Literal["end", "label"] = "end"
    shots: int = 0
    """Solved examples (taken from the validation split) before each question."""
    validation_fraction: float = 0.5
    seed: int = 0
    """Seeds the validation/test split and the choice of few-shot examples."""
    format: MCQAFormat = PAPER_FORMAT

    def label_tuple(self) -> tuple[str, ...]:
        if isinstance(self.labels, str):
            if self.labels not in LABEL_SETS:
                raise HeadlabError(f"unknown label set {self.labels!r}; use one of {sorted(LABEL_SETS)} or a tuple of labels")
            return LABEL_SETS[self.labels]
        return tuple(self.labels)


@dataclass(frozen=True)
class MCQASample:
    """A question, its options and the index of the correct option."""

    question: str
    options: tuple[str, ...]
    answer: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ValueError(f"a multiple-choice question needs at least 2 options, got {len(self.options)}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer index {self.answer} is outside the {len(self.options)} options (0-based)")


def _sample_from_record(record: dict[str, Any]) -> MCQASample:
    question = text_field(record, "question")
    if "options" in record:
        options = record["options"]
        if isinstance(options, str):  # CSV: options separated by "|"
            options = [o.strip() for o in options.split("|")]
    else:
        cols = [c for c in record if c.lower().startswith("option")]
        if not cols:
            raise KeyError("options")
        options = [record[c] for c in sorted(cols)]
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"'options' must be a list of non-empty strings (in CSV: 'a | b | c'), got {options!r}")
    answer = record["answer"]
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        answer = int(answer)
    elif isinstance(answer, str):
        label = answer.strip()
        for labels in LABEL_SETS.values():
            if label in labels[: len(options)]:
                answer = labels.index(label)
                break
        else:
            raise ValueError(f"'answer' {answer!r} is neither a 0-based option index nor an option label (A, 1, a ...)")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise ValueError(f"'answer' must be a 0-based option index or a label, got {answer!r}")
    return MCQASample(question, tuple(options), answer, {k: v for k, v in record.items() if k not in ("question", "options", "answer")})


def build_dataset(path: str | Path | None = None, samples: Sequence[MCQASample] | None = None) -> list[MCQASample]:
    """MCQA samples from a file or a list.

    JSONL: {"question": str, "options": [str, ...], "answer": 0-based index or label ("B")};
    CSV: columns question, options ("a | b | c") or option_1, option_2, ..., answer.
    """
    if path is not None:
        return records_to(path, _sample_from_record)
    if not samples:
        raise HeadlabError("the select-and-copy analysis needs MCQA samples: pass `samples` or a dataset `path`")
    return list(samples)


def zoo_dataset(n: int, seed: int = 30_000, label_set: str = "letters") -> list[MCQASample]:
    """The zoo's MCQA task ("which is a CATEGORY ?", four options) as MCQASamples."""
    from headlab.zoo import tasks

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = tasks.mcqa(rng, label_set)
        question = ex.prompt.split(" : ", 1)[1].split(" ?")[0] + " ?"
        out.append(MCQASample(question, tuple(ex.meta["options"]), ex.meta["correct"], {"label_set": label_set}))
    return out


@dataclass
class RenderedPrompt:
    """A prompt and the character ranges [start, end) of each scored option's label and whole option."""

    text: str
    label_chars: list[tuple[int, int]]
    option_chars: list[tuple[int, int]]


def render(sample: MCQASample, labels: Sequence[str], fmt: MCQAFormat = PAPER_FORMAT,
           shots: Sequence[MCQASample] = ()) -> RenderedPrompt:
    """The prompt text, with shots first, and where the last question's labels and options are."""
    if len(sample.options) > len(labels):
        raise HeadlabError(f"the question has {len(sample.options)} options but the label set has only {len(labels)} labels")
    text = ""
    for shot in shots:
        text += render(shot, labels, fmt).text + fmt.shot_answer.format(label=labels[shot.answer])
    text += fmt.question.format(question=sample.question)
    label_chars, option_chars = [], []
    for label, option in zip(labels, sample.options):
        piece = fmt.option.format(label=label, option=option)
        at = piece.index(label)  # the template puts the label before the option text
        label_chars.append((len(text) + at, len(text) + at + len(label)))
        option_chars.append((len(text), len(text) + len(piece)))
        text += piece
    return RenderedPrompt(text + fmt.answer, label_chars, option_chars)


def _token_at(offsets: Sequence[tuple[int, int]], lo: int, hi: int, last: bool) -> int:
    """Index of the token covering the first (or last) covered character of [lo, hi)."""
    chars = range(hi - 1, lo - 1, -1) if last else range(lo, hi)
    for c in chars:
        for t, (a, b) in enumerate(offsets):
            if a <= c < b:
                return t
    raise HeadlabError(f"no token covers characters {lo}..{hi} of the prompt; the tokenizer's offsets do not map the option")


def key_positions(model: HeadModel, prompt: RenderedPrompt, key_token: str) -> tuple[list[int], list[int]]:
    """(input ids, the key position of each option) for a rendered prompt."""
    try:
        enc = model.text_tokenizer(prompt.text, return_offsets_mapping=True)
    except NotImplementedError:
        raise HeadlabError("select-and-copy needs a fast tokenizer (offset mapping) to find the option tokens; "
                           "load the model with its tokenizer.json (use_fast=True)") from None
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if key_token == "label":
        pos = [_token_at(offsets, a, b, last=False) for a, b in prompt.label_chars]
    elif key_token == "end":
        pos = [_token_at(offsets, a, b, last=True) for a, b in prompt.option_chars]
    else:
        raise HeadlabError(f"key_token must be 'end' or 'label', got {key_token!r}")
    if len(set(pos)) != len(pos):
        raise HeadlabError(f"two options map to the same key token ({pos}); use key_token='label' or a format whose "
                           "options end in distinct tokens")
    return enc["input_ids"], pos


@dataclass
class SampleReading:
    """What one forward pass gives for one question: [L, H, O] scores, the baseline's label logits [O]."""

    qk: torch.Tensor
    attention: torch.Tensor
    label_logits: torch.Tensor
    answer: int


def read_sample(model: HeadModel, sample: MCQASample, config: SelectCopyConfig,
                shots: Sequence[MCQASample] = ()) -> SampleReading:
    """One forward pass: QK- and attention-scores of every head for every option, and the baseline logits."""
    labels = config.label_tuple()[: len(sample.options)]
    prompt = render(sample, labels, config.format, shots)
    ids, pos = key_positions(model, prompt, config.key_token)
    label_ids = choice.continuation_token_ids(model, prompt.text, labels)
    x = torch.tensor([ids], device=model.device)
    with model.patched(None, StatsRequest(keys=pos, queries=slice(-1, None))) as rec:
        logits = model(x).logits[0, -1].float()
    return SampleReading(qk=rec.stats.key_logits[:, 0, :, 0].float().cpu(),
                         attention=rec.stats.key_probs[:, 0, :, 0].float().cpu(),
                         label_logits=logits[label_ids].cpu(), answer=sample.answer)


@dataclass
class SelectCopyResult:
    """Per-head accuracy on the validation split, and the best head's test accuracy vs the baseline."""

    qk_accuracy: HeadScores
    attention_accuracy: HeadScores
    test: dict
    """best_head (by validation QK accuracy), its test QK / attention accuracy, baseline test accuracy, sizes."""
    samples: Any
    """DataFrame: one row per question — split, answer, baseline prediction, best head's predictions."""
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per validation question, 1 where the head's QK- (attention-) score picks the answer: [n_val, L, H]."""
    prompts: list[str] = field(default_factory=list)
    """The rendered prompt of every question (what the model read)."""

    def select_copy_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        return self.qk_accuracy.top(k)


def split(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (validation indices, test indices)."""
    if not 0 < validation_fraction < 1:
        raise HeadlabError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = max(1, min(n - 1, round(n * validation_fraction)))
    return sorted(order[:cut]), sorted(order[cut:])


def score(model: HeadModel, samples: Sequence[MCQASample], config: SelectCopyConfig = SelectCopyConfig(),
          progress: bool = True, cache: MutableMapping[str, Any] | None = None) -> SelectCopyResult:
    """Read every question, choose the best heads on the validation split, evaluate on the test split.

    `cache` (e.g. a run's `Checkpoint`) keeps each question's reading: a resumed run skips them.
    """
    import pandas as pd

    samples = build_dataset(samples=samples)
    if len(samples) < 2:
        raise HeadlabError("select-and-copy needs at least 2 questions (a validation and a test split)")
    val, test = split(len(samples), config.validation_fraction, config.seed)
    rng = random.Random(config.seed + 1)
    readings: dict[int, SampleReading] = {}
    prompts: list[str] = []
    for i in tqdm(range(len(samples)), desc="select-copy", disable=not progress):
        # drawn for every question, finished or not, so that a resumed run picks the same shots
        pool = [j for j in val if j != i]
        shots = [samples[j] for j in rng.sample(pool, min(config.shots, len(pool)))] if config.shots else []
        prompts.append(render(samples[i], config.label_tuple()[: len(samples[i].options)], config.format, shots).text)

        def compute(i=i, shots=shots):
            r = read_sample(model, samples[i], config, shots)
            return {"qk": r.qk.tolist(), "attention": r.attention.tolist(), "label_logits": r.label_logits.tolist(),
                    "answer": r.answer}

        d = cached(cache, str(i), compute)
        readings[i] = SampleReading(torch.tensor(d["qk"]), torch.tensor(d["attention"]), torch.tensor(d["label_logits"]),
                                    d["answer"])

    def accuracy(which: str, idx: list[int]) -> torch.Tensor:  # [L, H] correct counts
        hits = [(getattr(readings[i], which).argmax(-1) == readings[i].answer).double() for i in idx]
        return torch.stack(hits).sum(0)

    L, H = model.spec.shape
    common = dict(model=model.name, params={"key_token": config.key_token, "shots": config.shots, "labels": list(config.label_tuple()),
                                             "split": "validation", "n": len(val)})
    counts = torch.full((L, H), float(len(val)), dtype=torch.float64)
    qk = HeadScores(sums=accuracy("qk", val), counts=counts, analysis="select_copy_qk", **common)
    att = HeadScores(sums=accuracy("attention", val), counts=counts.clone(), analysis="select_copy_attention", **common)
    bl, bh, _ = qk.top(1)[0]
    test_qk = float(accuracy("qk", test)[bl, bh]) / len(test)
    test_att = float(accuracy("attention", test)[bl, bh]) / len(test)
    baseline = sum(int(readings[i].label_logits.argmax()) == readings[i].answer for i in test) / len(test)
    random_head = float(accuracy("qk", test).mean()) / len(test)  # the expected test accuracy of a head drawn at random
    rows, in_val = [], set(val)
    for i, s in enumerate(samples):
        r = readings[i]
        rows.append({"sample": i, "split": "validation" if i in in_val else "test", "question": s.question, "answer": s.answer,
                     "baseline_pred": int(r.label_logits.argmax()), "best_head_qk_pred": int(r.qk[bl, bh].argmax()),
                     "best_head_attention_pred": int(r.attention[bl, bh].argmax())})
    return SelectCopyResult(
        qk_accuracy=qk, attention_accuracy=att,
        test={"best_head": [bl, bh], "qk_accuracy": test_qk, "attention_accuracy": test_att, "baseline_accuracy": baseline,
              "random_head_qk_accuracy": random_head, "validation_size": len(val), "test_size": len(test)},
        samples=pd.DataFrame(rows),
        per_sample={which: torch.stack([(getattr(readings[i], which).argmax(-1) == readings[i].answer).float() for i in val])
                    for which in ("qk", "attention")},
        prompts=prompts,
    )


def evaluate(model: HeadModel, samples: Sequence[MCQASample], head: tuple[int, int], config: SelectCopyConfig = SelectCopyConfig(),
             progress: bool = False) -> dict:
    """Accuracy of one head's QK- and attention-score predictions, and of the baseline, on `samples`."""
    l, h = head
    model.spec.check_head(l, h)
    rs = [read_sample(model, s, config) for s in tqdm(samples, desc="evaluate", disable=not progress)]
    n = len(rs)
    return {"head": [l, h], "n": n,
            "qk_accuracy": sum(int(r.qk[l, h].argmax()) == r.answer for r in rs) / n,
            "attention_accuracy": sum(int(r.attention[l, h].argmax()) == r.answer for r in rs) / n,
            "baseline_accuracy": sum(int(r.label_logits.argmax()) == r.answer for r in rs) / n}


def paper_table(summary: dict) -> list[dict]:
    """The paper's comparison on the test split: label-logit baseline, the best QK / attention head
    (chosen on the validation split) and a head drawn at random (the control)."""
    return [{"metric": "test accuracy", "label-logit baseline": summary["baseline_accuracy"],
             "best head, QK-score": summary["qk_accuracy"], "best head, attention": summary["attention_accuracy"],
             "random head, QK-score": summary["random_head_qk_accuracy"], "best head": "L{}H{}".format(*summary["best_head"]),
             "n": summary["test_size"]}]


@analysis("select_copy", "score",
          summary="Select-and-copy heads (Tulchinskii et al. 2024): QK-score per option, best head vs the letter baseline.",
          paper="Tulchinskii et al. 2024, Listening to the Wise Few: Select-and-Copy Attention Heads for Multiple-Choice QA",
          datasets="JSONL/CSV with question, options, answer (--data); zoo task models bring their own",
          writes=("qk_accuracy", "attention_accuracy", "samples", "per_sample", "summary"), files=("data",),
          flags={"prompt_format": "--format"}, table=paper_table,
          choices={"labels": tuple(sorted(LABEL_SETS)), "key_token": ("end", "label"), "prompt_format": ("paper", "zoo")},
          help={"data": "JSONL/CSV with question, options, answer", "n": "zoo questions when no --data",
                "labels": "option labels: letters | digits | lower",
                "key_token": "end (the option's last token, the paper) | label", "shots": "in-context examples",
                "prompt_format": "paper | zoo (default: zoo for zoo task models)"}, modality="text")
def job(model: str, out: str | Path = "runs", run_id: str | None = None, *, data: str | None = None,
        n: int = 200, labels: str = "letters", key_token: str = "end", shots: int = 0,
        prompt_format: str | None = None, progress: bool = True) -> Path:
    from headlab import jobs

    zoo_model = jobs.is_zoo_task_model(model)
    prompt_format = prompt_format or ("zoo" if zoo_model else "paper")
    if prompt_format not in ("zoo", "paper"):
        raise HeadlabError(f"--format must be 'paper' or 'zoo', got {prompt_format!r}")
    params = {"data": data, "n": n, "labels": labels, "key_token": key_token, "shots": shots, "format": prompt_format}
    if labels not in LABEL_SETS:
        raise HeadlabError(f"--labels must be one of {', '.join(sorted(LABEL_SETS))}, got {labels!r}")
    if key_token not in ("end", "label"):
        raise HeadlabError(f"--key-token must be 'end' (the option's last token) or 'label', got {key_token!r}")
    jobs.check_count(n, "--n", 2)
    jobs.check_count(shots, "--shots", 0)
    if data:
        samples = build_dataset(path=data)
    elif zoo_model:
        samples = zoo_dataset(n, label_set=labels)
    elif jobs.is_corpus_model(model):
        raise HeadlabError(f"select-and-copy heads do not apply to {model}: it was trained on Python source only and has "
                           "no multiple-choice format to read labels from; give --data (JSONL/CSV of question, options, "
                           "answer) to score it anyway")
    else:
        raise HeadlabError(f"give --data (JSONL/CSV of question, options, answer) for {model}")
    config = SelectCopyConfig(labels=labels, key_token=key_token, shots=shots,  # type: ignore[arg-type]
                              format=ZOO_FORMAT if prompt_format == "zoo" else PAPER_FORMAT)
    with jobs.started(out, "select_copy", model, params, run_id) as (run, hm):
        result = score(hm, samples, config, progress=progress, cache=jobs.checkpoint(run))
        summary = {**result.test, "top_heads": [[l, h, s] for l, h, s in result.qk_accuracy.top(10)]}
        val = result.samples[result.samples["split"] == "validation"]["sample"].tolist()
        run.save_per_sample({"qk_accuracy": result.per_sample["qk"], "attention_accuracy": result.per_sample["attention"]},
                            [f"question {i}" for i in val])
        run.save_examples([{"text": result.prompts[i], "label": f"question {i}: answer {samples[i].answer}"} for i in val])
        return jobs.finish(run, summary, {"qk_accuracy": result.qk_accuracy, "attention_accuracy": result.attention_accuracy},
                           result.samples)
