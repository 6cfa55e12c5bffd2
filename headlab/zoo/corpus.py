"""The held-out real text shipped with `zoo:pycode-llama`.

The model was trained on the `.py` source of the GPU image's interpreter (`studies/zoo/train_text.py`);
the standard-library files of its validation split ship beside the weights (`heldout.jsonl.gz`,
PSF-licensed), so tasks, its card and the tests use code the model never trained on, on any
machine (this one's own interpreter holds other versions of the same files).

- `heldout()` — every held-out file (path, sha256, text); `code_files()` — their texts without the
  charmap tables of `encodings/` (tables, not code);
- `texts(tokenizer, n, max_tokens)` — chunks of that code, cut at line ends (sinks, patterns);
- `model_tokenizer()` — the model's own tokenizer.
The tasks built on this code (a needle grid, copy pairs, a bracket closed-choice task) live on the
analyses floor: `headlab.analyses.code_tasks`.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import cache
from typing import Any

from headlab.errors import HeadlabError

MODEL = "pycode-llama"
@cache
def model_tokenizer(model: str = MODEL) -> Any:
    """The zoo model's own tokenizer (its held-out tasks are measured in its tokens)."""
    from transformers import AutoTokenizer

    from headlab import zoo

    return AutoTokenizer.from_pretrained(str(zoo.path(model)))


@cache
def heldout(model: str = MODEL) -> tuple[dict[str, str], ...]:
    """Every held-out file shipped with the zoo model: dicts with path, sha256, text."""
    from headlab import zoo

    path = zoo.path(model) / "heldout.jsonl.gz"
    if not path.is_file():
        raise HeadlabError(f"zoo:{model} ships no held-out corpus ({path.name}); the corpus tasks need the real-text model")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def code_files(model: str = MODEL) -> list[str]:
    """The held-out files' texts, charmap tables excluded."""
    return [f["text"] for f in heldout(model) if not f["path"].startswith("encodings/")]


def lines_up_to(tokenizer: Any, text: str, n_tokens: int, start_line: int = 0) -> list[str]:
    """Whole lines of `text` from `start_line` whose tokens add up to at most `n_tokens`."""
    out, total = [], 0
    for line in text.split("\n")[start_line:]:
        k = len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
        if total + k > n_tokens:
            break
        out.append(line)
        total += k
    return out


def texts(tokenizer: Any | None = None, n: int = 12, max_tokens: int = 512, seed: int = 0) -> list[str]:
    """`n` chunks of held-out code of at most `max_tokens` tokens each, cut at line ends."""
    tokenizer = tokenizer or model_tokenizer()
    files = code_files()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = files[i % len(files)]
        lines = text.split("\n")
        start = rng.randrange(max(1, len(lines) - 40))
        chunk = "\n".join(lines_up_to(tokenizer, text, max_tokens, start))
        if chunk.strip():
            out.append(chunk)
    return out
