"""Tasks made from real code: the held-out Python source of `zoo:pycode-llama` (`headlab.zoo.corpus`).

- `needle_samples(tokenizer, lengths, depths, per_cell)` — a string constant defined once inside
  real code and asked for at the end: `cache_key = "juniper"` … `assert cache_key == "` → `juniper"`
  (a context-length × depth grid; lengths in tokens). The copy is the model's own: nothing in its
  training planted it (it retrieves about 2 in 3).
- `copy_pairs(...)` — the same task as clean / corrupted pairs for path patching: the corrupted
  prompt defines another value with the same token count; the "context" answer is the clean
  prompt's value, the "memory" answer the corrupted one.
- `bracket_choices(tokenizer, n)` — closed choice at real positions of the code: which bracket
  closes here, `)`, `]` or `}` (the evaluation behind ACT's and ZeroTuning's searches).
A tokenizer of None means the zoo model's own.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from headlab.analyses.choice import ChoiceSample
from headlab.analyses.conflict import ConflictSample
from headlab.analyses.retrieval import NeedleSample

from headlab.zoo.corpus import code_files, lines_up_to, model_tokenizer

NAMES = ("cache_key", "session_token", "build_tag", "retry_label", "batch_name", "magic_name", "default_mode",
         "backend_name", "theme_color", "region_code")
WORDS = ("amber", "basil", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
         "willow", "yonder", "zephyr", "cobalt", "meadow", "orchid", "pebble", "thistle")
NEEDLE = '{name} = "{value}"'
QUESTION = 'assert {name} == "'


def needle_samples(tokenizer: Any | None = None, lengths: Sequence[int] = (128, 256, 512, 896),
                   depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), per_cell: int = 2,
                   seed: int = 0) -> list[NeedleSample]:
    """NeedleSamples of the code needle task over a length × depth grid (haystack lengths in tokens)."""
    tokenizer = tokenizer or model_tokenizer()
    files = code_files()
    rng = random.Random(seed)
    samples = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                text = rng.choice(files)
                start = rng.randrange(max(1, len(text.split("\n")) // 2))
                hay = lines_up_to(tokenizer, text, length, start)
                name = rng.choice(NAMES)
                value = rng.choice([w for w in WORDS if w not in text])
                needle = NEEDLE.format(name=name, value=value)
                at = round(depth * len(hay))
                prompt = "\n".join(hay[:at] + [needle] + hay[at:]) + "\n" + QUESTION.format(name=name)
                samples.append(NeedleSample(prompt, needle, f'{value}"',
                                            {"length": length, "depth": depth, "name": name, "value": value}))
    return samples


def copy_pairs(tokenizer: Any | None = None, n: int = 32, length: int = 256, seed: int = 1) -> list[ConflictSample]:
    """ConflictSamples of the needle task: the clean prompt defines `value`, the corrupted twin another
    value of the same token count; context answer = the clean value, memory answer = the other."""
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


def bracket_choices(tokenizer: Any | None = None, n: int = 120, max_tokens: int = 256, seed: int = 0) -> list[ChoiceSample]:
    """ChoiceSamples: held-out code cut just before a closing bracket that follows some content;
    choices `)`, `]`, `}`, the kinds in turn as far as the code has them (`}` is rare in Python)."""
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
