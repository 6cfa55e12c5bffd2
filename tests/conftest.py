"""Tiny random-weight models of every supported architecture, saved as real HF directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers

if not torch.cuda.is_available():
    # Triton kernels under test run in Triton's CPU interpreter; it must be chosen before any
    # kernel is defined (at import), so it is set here, before the tests import headlab.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 97


def _llama(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)


TINY_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: _llama(architectures=["LlamaForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, architectures=["Qwen2ForCausalLM"]),
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              architectures=["Qwen3ForCausalLM"]),
    "mistral": lambda: transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                                  architectures=["MistralForCausalLM"]),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                architectures=["Gemma2ForCausalLM"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                    architectures=["Gemma3ForCausalLM"]),
    "phi3": lambda: transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                                            architectures=["Phi3ForCausalLM"]),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                            architectures=["GPT2LMHeadModel"]),
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512, architectures=["BertModel"]),
}
CAUSAL_ARCHS = [a for a in TINY_CONFIGS if a != "bert"]


def build_tiny(name: str, directory: Path, seed: int = 0, init: float = 0.2) -> Path:
    """Save a tiny random model of architecture `name`; a larger init gives peaky attention."""
    config = TINY_CONFIGS[name]()
    config.initializer_range = init
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    cls(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_dirs) -> Path:
    return tiny_dirs("llama")
