"""Which tokens begin a word: for proposals (intermediate concepts, slot swaps) that work on any tokenizer,
word-level (every token a word) or subword (a leading space marks a word's start)."""

from __future__ import annotations

from transformer_lens import HookedTransformer


def spaced_vocabulary(model: HookedTransformer) -> bool:
    """Whether the tokenizer marks a word's start with a leading space (byte-level BPE, SentencePiece)."""
    first = int(model.to_tokens(" the", prepend_bos=False)[0, 0])
    return model.to_single_str_token(first).startswith(" ")


def starts_word(text: str, spaced: bool) -> bool:
    """A token that begins a word: letters, after a leading space where the vocabulary marks word starts."""
    return any(c.isalpha() for c in text) and (text.startswith(" ") or not spaced)
