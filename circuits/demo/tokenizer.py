"""A word-level tokenizer for the demo world, wrapped as a Hugging Face fast tokenizer.

Words and punctuation are separate tokens; every named entity (including multi-word ones
such as "Salt Lake City") is a single token. Ids: <pad>=0, <bos>=1, <unk>=2, then the
vocabulary in sorted order. The tokenizer prepends <bos> itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from circuits.demo.corpus import all_template_sentences
from circuits.demo.facts import entity_names

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"


def _split_pattern(entities: list[str]) -> str:
    multi_word = sorted((e for e in entities if " " in e), key=len, reverse=True)
    return "|".join([*(re.escape(e) for e in multi_word), r"\w+", r"[^\w\s]"])


def build_tokenizer() -> PreTrainedTokenizerFast:
    entities = entity_names()
    pattern = _split_pattern(entities)
    words = set(entities)
    for sentence in all_template_sentences():
        words.update(re.findall(pattern, sentence))
    vocab = {PAD: 0, BOS: 1, UNK: 2}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=UNK, pad_token=PAD, padding_side="right"
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    tokenizer.save_pretrained(str(directory))
