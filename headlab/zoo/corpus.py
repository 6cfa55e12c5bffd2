"""Tasks made from real text: the held-out Python source shipped with `zoo:pycode-llama`.

The model was trained on the `.py` source of the GPU image's interpreter (`studies/zoo/train_text.py`);
the standard-library files of its validation split ship beside the weights (`heldout.jsonl.gz`,
PSF-licensed), so tasks, its card and the tests use code the model never trained on, on any
machine (this one's own interpreter holds other versions of the same files).

- `code_files()` — the held-out files, without the charmap tables of `encodings/` (tables, not code).
- `texts(tokenizer, n, max_tokens)` — chunks of that code, cut at line ends (sinks, patterns).
- `needle_samples(tokenizer, lengths, depths, per_cell)` — a string constant defined once inside
  real code and asked for at the end: `cache_key = "juniper"` … `assert cache_key == "` → `juniper"`
  (a context-length × depth grid; lengths in tokens). The copy is the model's own: nothing in its
  training planted it.
- `copy_pairs(...)` — the same task as clean / corrupted pairs for path patching: the corrupted
  prompt defines another value with the same token count; the "context" answer is the clean
  prompt's value, the "memory" answer the corrupted one.
- `bracket_choices(tokenizer, n)` — closed choice at real positions of the code: which bracket
  closes here, `)`, `]` or `}` (the evaluation behind ACT's and ZeroTuning's searches).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from functools import lru_cache
from typing import Any, Sequence

from headlab.errors import HeadlabError

MODEL = "pycode-llama"
NAMES = ("cache_key", "session_token", "build_tag", "retry_label", "batch_name", "magic_name", "default_mode",
         "backend_name", "theme_color", "region_code")
WORDS = ("amber", "basil", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
         "willow", "yonder", "zephyr", "cobalt", "meadow", "orchid", "pebble", "thistle")
NEEDLE = '{name} = "{value}"'
QUESTION = 'assert {name} == "'


@lru_cache(maxsize=None)
def model_tokenizer(model: str = MODEL) -> Any:
    """The zoo model's own tokenizer (its held-out tasks are measured in its tokens)."""
    from transformers import AutoTokenizer

    from headlab import zoo

    return AutoTokenizer.from_pretrained(str(zoo.path(model)))


@lru_cache(maxsize=None)
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


def _lines_up_to(tokenizer: Any, text: str, n_tokens: int, start_line: int = 0) -> list[str]:
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
        chunk = "\n".join(_lines_up_to(tokenizer, text, max_tokens, start))
        if chunk.strip():
            out.append(chunk)
    return out


def needle_samples(tokenizer: Any | None = None, lengths: Sequence[int] = (128, 256, 512, 896),
                   depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), per_cell: int = 2, seed: int = 0) -> list:
    """NeedleSamples of the code needle task over a length × depth grid (haystack lengths in tokens)."""
    from headlab.analyses.retrieval import NeedleSample

    tokenizer = tokenizer or model_tokenizer()
    files = code_files()
    rng = random.Random(seed)
    samples = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                text = rng.choice(files)
                start = rng.randrange(max(1, len(text.split("\n")) // 2))
                hay = _lines_up_to(tokenizer, text, length, start)
                name = rng.choice(NAMES)
                value = rng.choice([w for w in WORDS if w not in text])
                needle = NEEDLE.format(name=name, value=value)
                at = round(depth * len(hay))
                prompt = "\n".join(hay[:at] + [needle] + hay[at:]) + "\n" + QUESTION.format(name=name)
                samples.append(NeedleSample(prompt, needle, f'{value}"',
                                            {"length": length, "depth": depth, "name": name, "value": value}))
    return samples


def copy_pairs(tokenizer: Any | None = None, n: int = 32, length: int = 256, seed: int = 1) -> list:
    """ConflictSamples of the needle task: the clean prompt defines `value`, the corrupted twin another
    value of the same token count; context answer = the clean value, memory answer = the other."""
    from headlab.analyses.conflict import ConflictSample

    tokenizer = tokenizer or model_tokenizer()
    rng = random.Random(seed)
    out = []
    for sample in needle_samples(tokenizer, (length,), (0.25, 0.5, 0.75), per_cell=max(1, n // 3 + 1), seed=seed):
        value = sample.meta["value"]
        size = len(tokenizer(sample.prompt)["input_ids"])
        others = [w for w in WORDS if w != value]
        rng.shuffle(others)
        for other in others:
            corrupted = sample.prompt.replace(f'"{value}"', f'"{other}"', 1)
            if len(tokenizer(corrupted)["input_ids"]) == size and other not in sample.prompt:
                out.append(ConflictSample(sample.prompt, f'{other}"', f'{value}"', corrupted, dict(sample.meta)))
                break
        if len(out) == n:
            break
    return out


CLOSERS = {")": "(", "]": "[", "}": "{"}


def bracket_choices(tokenizer: Any | None = None, n: int = 120, max_tokens: int = 256, seed: int = 0) -> list:
    """ChoiceSamples: held-out code cut just before a closing bracket that follows some content;
    choices `)`, `]`, `}`, the kinds in turn as far as the code has them (`}` is rare in Python)."""
    from headlab.analyses.choice import ChoiceSample

    tokenizer = tokenizer or model_tokenizer()
    candidates: dict[str, list[str]] = {c: [] for c in CLOSERS}
    for text in code_files():
        for m in re.finditer(r"[^\s(\[{]\s*([)\]}])", text):  # a closer after some content (not `()`, `[]`)
            closer = m.group(1)
            prompt = "\n".join(text[: m.start(1)].split("\n")[-40:])  # up to the closer's indentation
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > max_tokens:  # keep the closing part: the opener may be cut, the context is not
                prompt = tokenizer.decode(ids[-max_tokens:])
            candidates[closer].append(prompt)
    rng = random.Random(seed)
    for pool in candidates.values():
        rng.shuffle(pool)
    choices = tuple(CLOSERS)
    out = []
    while len(out) < n and any(candidates.values()):
        for closer, pool in candidates.items():
            if pool and len(out) < n:
                out.append(ChoiceSample(pool.pop(), choices, choices.index(closer), {"closer": closer}))
    return out
