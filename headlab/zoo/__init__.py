"""Models shipped inside the package, loadable as `headlab.load_model("zoo:<name>")`.

Each model is a plain Hugging Face directory under this folder (config.json, safetensors
weights, tokenizer, card). The trained zoo is the subject of its own issue; until it lands the
zoo is empty and `headlab demo` builds a small model from a config instead.
"""

from __future__ import annotations

from pathlib import Path

from headlab.errors import ModelNotFoundError

ROOT = Path(__file__).parent


def available() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
    """Directory of the bundled model `name`."""
    if name in available():
        return ROOT / name
    have = ", ".join(available()) or "none bundled yet"
    raise ModelNotFoundError(f"no zoo model named {name!r} (available: {have})")
