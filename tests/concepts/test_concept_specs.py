"""Words with "=" in them: a token such as "=" or "a=b" (the byte-level BPE of the tiny GPT-2 spells
both) can be a concept given as (name, words), the form the report uses for the concepts it proposes
itself (a string spec NAME=WORDS splits at its last "=")."""

from __future__ import annotations

import pytest

from circuits.concepts.lens import make_concept, word_tokens
from circuits.concepts.report import resolve_concepts
from circuits.models import load_model
from tests.hf_models import write_tiny_hf_model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_model(str(write_tiny_hf_model("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2")))


def test_words_with_equals_signs_are_concepts(gpt2):
    eq = make_concept(gpt2, ("=", ["="]))
    assert (eq.name, eq.words, eq.token_ids) == ("=", ("=",), (word_tokens(gpt2, "="),))
    made, paths = resolve_concepts(gpt2, [("a=b", ["a=b"]), ("=", ["="])], [["a=b", "="]], {})
    assert paths == [["a=b", "="]]
    assert made["a=b"].token_ids == (word_tokens(gpt2, "a=b"),) and made["="].words == ("=",)
