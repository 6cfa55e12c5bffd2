"""`headlab demo`: a patched forward with an intervention and stats on a small model, saved as a run.

Until the trained zoo lands, the demo builds a small Llama-architecture model (random weights)
and a word-level tokenizer from code, saves them as a normal Hugging Face directory and loads
that directory back through `load_model` — the same loading path a real model takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headlab.model import HeadModel, load_model
from headlab.plan import InterventionPlan
from headlab.runs import Run
from headlab.scores import HeadScores
from headlab.stats import StatsRequest

WORDS = (
    "the a of and to in is was it that on for with as at by this from or an be are have not"
    " key value door river stone cloud lamp tree bird glass red blue green gold silver quiet loud"
    " question answer what where needle hidden secret number one two three four five six seven . ?"
).split()


def build_tokenizer(directory: Path) -> Any:
    """The demo's word-level tokenizer, saved to `directory`."""
    from headlab.zoo.tokenizer import build_word_tokenizer

    return build_word_tokenizer(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS], directory)


def build_demo_model(directory: str | Path, seed: int = 0) -> Path:
    """Save a small random-weight LlamaForCausalLM (4 layers, 8 q / 2 kv heads, d=128) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.25,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def demo_prompt(seed: int = 0, filler: int = 60) -> tuple[str, str]:
    """(prompt, needle): a haystack of filler words with a needle sentence and a question."""
    rng = random.Random(seed)
    hay = [rng.choice(WORDS[:24]) for _ in range(filler)]
    needle = "the secret key is blue stone ."
    at = rng.randrange(len(hay))
    words = hay[:at] + needle.split() + hay[at:] + "question what is the secret key ?".split()
    return " ".join(words), needle


@dataclass
class DemoResult:
    run_dir: Path
    table: Any
    kl: float


def run_demo(out: str | Path = "runs", model: str | None = None, seed: int = 0, cache_dir: str | Path | None = None) -> DemoResult:
    """Load a model, run baseline and patched forwards with stats, print a table, write a run."""
    if model is None:
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "headlab" / "demo-llama"
        model = str(build_demo_model(cache, seed=seed))
    hm: HeadModel = load_model(model)
    prompt, needle = demo_prompt(seed)
    ids = hm.tokenize(prompt)["input_ids"]
    needle_ids = hm.tokenize(needle, add_special_tokens=False)["input_ids"][0].tolist()
    start = _find(ids[0].tolist(), needle_ids)
    spans = {"first": [0], "needle": (start, start + len(needle_ids))}
    plan = InterventionPlan().prune_heads([(2, 3)]).scale_first_token({(1, 2): 1.5}).for_model(hm.spec)
    request = StatsRequest(argmax=True, entropy=True, spans=spans, queries=slice(-8, None))
    params = {"plan": plan.to_dict(), "spans": {k: list(v) for k, v in spans.items()}, "queries": "last 8", "prompt": prompt}

    with Run(out, analysis="demo", model=model, params=params, seed=seed) as run:
        base_logits = hm(ids).logits[0, -1].float()
        with hm.patched(None, request) as base:
            hm(ids)
        with hm.patched(plan, request) as rec:
            logits = hm(ids).logits[0, -1].float()
        kl = float(torch.nn.functional.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="sum"))
        table = per_head_table(base.stats, rec.stats)
        first = rec.stats.span_mass("first").mean(dim=(1, 3))  # [L, H]
        scores = HeadScores.from_tensor(first, "first_token_mass", counts=float(rec.stats.query_positions.numel()),
                                        model=model, params={"queries": "last 8"})
        run.save_scores(scores)
        run.save_samples(table)
        run.save_figure(scores.plot(), "first_token_mass")
        run.manifest["summary"] = {"kl_next_token": kl, "tokens": int(ids.shape[1])}
    return DemoResult(run_dir=run.dir, table=table, kl=kl)


def per_head_table(base: Any, patched: Any) -> Any:
    """One row per head: first-token and needle mass, entropy and top key of the last query."""
    import pandas as pd

    rows = []
    for name, st in (("baseline", base), ("patched", patched)):
        first, needle = st.span_mass("first").mean(dim=(1, 3)), st.span_mass("needle").mean(dim=(1, 3))
        ent, top = st.entropy.mean(dim=(1, 3)), st.argmax[:, 0, :, -1]
        for li, layer in enumerate(st.layers):
            for h in range(first.shape[1]):
                rows.append({"run": name, "layer": layer, "head": h, "first_mass": float(first[li, h]),
                             "needle_mass": float(needle[li, h]), "entropy": float(ent[li, h]),
                             "last_query_top_key": int(top[li, h])})
    return pd.DataFrame(rows)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise ValueError("needle not found in the tokenized prompt")
