"""Word-level tokenizers built from a word list (a real `tokenizers` tokenizer, AutoTokenizer-loadable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def build_word_tokenizer(words: Sequence[str], directory: str | Path | None = None) -> Any:
    """A PreTrainedTokenizerFast over `words` (which start with <pad> <unk> <bos> <eos>).

    Text is split on whitespace; every encoded text starts with <bos>. Saved to `directory` when given.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for special in ("<pad>", "<unk>", "<bos>", "<eos>"):
        if special not in vocab:
            raise ValueError(f"the word list must contain {special}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast
