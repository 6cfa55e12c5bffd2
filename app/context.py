"""What every page and callback of one app instance shares, and the small helpers they use to
turn URL / form values into library objects (validated, with errors that say what to fix)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from headlab.errors import HeadlabError
from headlab.mask import HeadMask
from headlab.runs import RunStore
from headlab.scores import HeadScores

from .models import ModelCache
from .tasks import TaskManager

SEP = "::"


@dataclass
class AppContext:
    store: RunStore
    models: ModelCache
    tasks: TaskManager

    # ---- score references "<run id>::<score name>" -------------------------------------------
    def score_options(self) -> list[dict[str, str]]:
        """Dropdown options for every HeadScores of every run, newest run first."""
        options = []
        for row in self.store.table():
            for name in filter(None, (s.strip() for s in row["scores"].split(","))):
                label = f"{row['analysis']} · {name} · {row['model']} · {row['started'][:16]}"
                options.append({"label": label, "value": f"{row['id']}{SEP}{name}"})
        return options

    def load_score(self, ref: str) -> tuple[str, str, HeadScores]:
        run_id, name = split_ref(ref)
        return run_id, name, self.store.score(run_id, name)


def split_ref(ref: Any) -> tuple[str, str]:
    if not isinstance(ref, str) or SEP not in ref:
        raise HeadlabError(f"not a score reference: {ref!r} (expected '<run id>{SEP}<score name>')")
    run_id, name = ref.split(SEP, 1)
    return run_id, name


def query_params(search: str | None) -> dict[str, str]:
    """The URL's query string as {key: first value}."""
    return {k: v[0] for k, v in parse_qs((search or "").lstrip("?")).items() if v}


def as_int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        out = int(number)
    except (TypeError, ValueError):
        raise HeadlabError(f"{what} must be a whole number, got {value!r}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise HeadlabError(f"{what} must be in {lo}..{hi}, got {out}")
    return out


def as_float(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise HeadlabError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise HeadlabError(f"{what} must be a finite number, got {value!r}")
    return out


def build_mask(scores: HeadScores, mode: str, k: Any, threshold: Any) -> HeadMask:
    """The mask the threshold / top-k control describes."""
    if mode == "threshold":
        return scores.to_mask(threshold=as_float(threshold, "threshold"))
    n = scores.shape[0] * scores.shape[1]
    return scores.to_mask(top_k=as_int(k, "top-k", 0, n))


MAX_TEXT_CHARS = 20_000
MAX_TOKENS = 4096
"""What one page request may run: at most this many characters, and tokens once tokenized."""


def check_text(text: Any, what: str) -> str:
    """The text, non-empty and within MAX_TEXT_CHARS."""
    if not isinstance(text, str) or not text.strip():
        raise HeadlabError(f"the {what} is empty: type a text or pick an example")
    if len(text) > MAX_TEXT_CHARS:
        raise HeadlabError(f"the {what} has {len(text):,} characters; the app runs at most {MAX_TEXT_CHARS:,} "
                           "(use the library or the CLI for longer inputs)")
    return text


def check_tokens(model: Any, text: str) -> None:
    """Refuse a text longer than MAX_TOKENS tokens for `model`."""
    n = len(model.text_tokenizer(text)["input_ids"])
    if n > MAX_TOKENS:
        raise HeadlabError(f"the text is {n:,} tokens; the app runs at most {MAX_TOKENS:,} per request")


def mask_summary(mask: HeadMask) -> str:
    heads = ", ".join(f"L{l}H{h}" for l, h in mask)
    return f"{len(mask)} of {mask.n_layers * mask.n_heads} heads: {heads or '(none)'}"

