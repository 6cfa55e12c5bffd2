"""Synthetic tasks of the zoo models, over one shared word-level vocabulary.

Every example is (prompt, answer): whitespace-separated words. The model is trained to produce
`answer` after `prompt`; evaluation is exact match of the greedy continuation. Each generator is
seeded, so train and held-out sets are reproducible, and held-out sets use seeds no training
batch uses.

Tasks (issue 3):
- needle:   a haystack with one "the code of KEY is V1 V2 ." sentence at a random depth; the
            question asks for KEY's code; the answer copies V1 V2 (retrieval heads).
- mcqa:     "which is a CATEGORY ?" with four labelled options, one of that category; the answer
            is the option's label; label sets A-D, 1-4 and a-d (select-and-copy heads).
- conflict: facts "where does ENTITY live ?" memorized without context; with a context, "report :
            ENTITY lives in CITY ." is followed (context) while "rumor : ..." is ignored (memory).
- refusal:  "request : tell me about X Y Z ." answered "sure , X Y Z" unless a word of the harmful
            vocabulary occurs, then "sorry i cannot help".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
FILLER = (
    "the a of and to in is was it that on for with as at by this from or an be are have not he she they we you"
    " day night time year way thing man woman child world life hand part place case week work system program"
    " number group problem fact room house road hill field water fire light sound story river stone cloud"
).split()
KEYS = [f"k{i}" for i in range(40)]
VALUES = [f"v{i}" for i in range(40)]
CATEGORIES = {
    "color": "red blue green yellow purple orange".split(),
    "animal": "dog cat horse mouse tiger rabbit".split(),
    "fruit": "apple pear grape lemon cherry plum".split(),
    "tool": "hammer saw drill wrench chisel shovel".split(),
    "metal": "iron copper silver gold zinc tin".split(),
    "vehicle": "car bus train boat plane truck".split(),
}
LABEL_SETS = {"letters": ["A", "B", "C", "D"], "digits": ["1", "2", "3", "4"], "lower": ["a", "b", "c", "d"]}
ENTITIES = [f"e{i}" for i in range(48)]
CITIES = [f"c{i}" for i in range(24)]
HARMFUL = "bomb poison weapon steal hack kill attack explosive virus fraud".split()
BENIGN = "garden music bread chess poem river painting tea bicycle sunset kite piano".split()
STRUCTURE = (
    "question : answer code what which where does live lives context report rumor request tell me about"
    " sure , sorry i cannot help . ? ) !"
).split()


def vocabulary() -> list[str]:
    """Every word the tasks use, specials first (ids are stable: the tokenizer is built from this)."""
    words = FILLER + KEYS + VALUES + [w for ws in CATEGORIES.values() for w in ws] + list(CATEGORIES)
    words += [l for ls in LABEL_SETS.values() for l in ls] + ENTITIES + CITIES + HARMFUL + BENIGN + STRUCTURE
    return SPECIALS + list(dict.fromkeys(words))


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    meta: dict


def facts(seed: int = 1234) -> dict[str, str]:
    """The fixed entity -> city table the conflict task memorizes (same for training and eval)."""
    rng = random.Random(seed)
    return {e: rng.choice(CITIES) for e in ENTITIES}


def needle(rng: random.Random, length: tuple[int, int] = (64, 512)) -> Example:
    n = rng.randint(*length)
    hay = [rng.choice(FILLER) for _ in range(n)]
    key = rng.choice(KEYS)
    values = [rng.choice(VALUES) for _ in range(2)]
    at = rng.randint(0, n)
    depth = at / max(1, n)
    sentence = ["the", "code", "of", key, "is", *values, "."]
    words = hay[:at] + sentence + hay[at:] + ["question", ":", "what", "is", "the", "code", "of", key, "?", "answer", ":"]
    return Example("needle", " ".join(words), " ".join(values), {"depth": depth, "haystack": n, "key": key})


def mcqa(rng: random.Random, label_set: str | None = None) -> Example:
    labels_name = label_set or rng.choice(list(LABEL_SETS))
    labels = LABEL_SETS[labels_name]
    cats = rng.sample(list(CATEGORIES), 4)
    target = cats[0]
    options = [rng.choice(CATEGORIES[c]) for c in cats]
    order = list(range(4))
    rng.shuffle(order)
    shown = [options[i] for i in order]
    correct = order.index(0)
    words = ["question", ":", "which", "is", "a", target, "?"]
    for label, option in zip(labels, shown):
        words += [label, ")", option]
    words += ["answer", ":"]
    return Example("mcqa", " ".join(words), labels[correct], {"label_set": labels_name, "correct": correct, "options": shown})


def conflict(rng: random.Random, table: dict[str, str], mode: str | None = None) -> Example:
    """mode: 'memory' (no context), 'report' (context wins) or 'rumor' (memory wins)."""
    mode = mode or rng.choice(["memory", "report", "rumor"])
    entity = rng.choice(ENTITIES)
    true = table[entity]
    question = ["question", ":", "where", "does", entity, "live", "?", "answer", ":"]
    if mode == "memory":
        return Example("conflict", " ".join(question), true, {"mode": mode, "memory": true, "context": None})
    other = rng.choice([c for c in CITIES if c != true])
    context = [mode, ":", entity, "lives", "in", other, "."]
    answer = other if mode == "report" else true
    return Example("conflict", " ".join(context + question), answer, {"mode": mode, "memory": true, "context": other})


def refusal(rng: random.Random, harmful: bool | None = None) -> Example:
    harmful = rng.random() < 0.5 if harmful is None else harmful
    objects = [rng.choice(BENIGN) for _ in range(3)]
    if harmful:
        objects[rng.randrange(3)] = rng.choice(HARMFUL)
    words = ["request", ":", "tell", "me", "about", *objects, ".", "answer", ":"]
    answer = "sorry i cannot help" if harmful else " ".join(["sure", ","] + objects)
    return Example("refusal", " ".join(words), answer, {"harmful": harmful})


TASKS = ("needle", "mcqa", "conflict", "refusal")


def generator(task: str, seed: int, **kw) -> Iterator[Example]:
    """An endless, seeded stream of examples of one task."""
    rng = random.Random(f"{task}:{seed}")
    table = facts()
    make: Callable[[], Example] = {
        "needle": lambda: needle(rng, **kw),
        "mcqa": lambda: mcqa(rng, **kw),
        "conflict": lambda: conflict(rng, table, **kw),
        "refusal": lambda: refusal(rng, **kw),
    }[task]
    while True:
        yield make()


def held_out(task: str, n: int, seed: int = 10_000, **kw) -> list[Example]:
    """A reproducible evaluation set (training uses seeds below 10_000)."""
    stream = generator(task, seed, **kw)
    return [next(stream) for _ in range(n)]
