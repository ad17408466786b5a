"""Sentences about the demo world from templates, deterministic by seed.

One-hop sentences state a single fact (city -> state, state -> capital); two-hop sentences
chain them ("Fact : Dallas is in the state whose capital is Austin ."). Held-out cities get
one-hop sentences only, so their two-hop prompts test composition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from circuits.demo.facts import STATE_OF_CITY, STATES, held_out_cities, trained_two_hop_cities

CITY_STATE = (
    "{city} is a city in {state} .",
    "{city} is in the state of {state} .",
    "Fact : {city} is in {state} .",
    "The city of {city} is in {state} .",
)
STATE_CAPITAL = (
    "The capital of {state} is {capital} .",
    "{capital} is the capital of {state} .",
    "Fact : the capital of {state} is {capital} .",
    "The state of {state} has its capital in {capital} .",
)
CAPITAL_STATE = ("{capital} is a city in {state} .",)
TWO_HOP = (
    "Fact : {city} is in the state whose capital is {capital} .",
    "The state that has {city} has its capital in {capital} .",
)

TWO_HOP_PROMPT = "Fact : {city} is in the state whose capital is"
ONE_HOP_CAPITAL_PROMPT = "The capital of {state} is"
ONE_HOP_STATE_PROMPT = "{city} is a city in"


def one_hop_sentences() -> list[str]:
    out = []
    for s in STATES:
        for city in s.cities:
            out += [t.format(city=city, state=s.name) for t in CITY_STATE]
        out += [t.format(state=s.name, capital=s.capital) for t in STATE_CAPITAL]
        out += [t.format(state=s.name, capital=s.capital) for t in CAPITAL_STATE]
    return out


def two_hop_sentences(cities: list[str]) -> list[str]:
    return [t.format(city=c, capital=STATE_OF_CITY[c].capital) for c in cities for t in TWO_HOP]


def all_template_sentences() -> list[str]:
    """Every sentence the corpus can contain (held-out cities' one-hop facts included)."""
    return one_hop_sentences() + two_hop_sentences(trained_two_hop_cities())


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    answer: str
    kind: str  # one_hop_capital | one_hop_state | two_hop | two_hop_held_out


def eval_prompts() -> list[EvalPrompt]:
    prompts = [EvalPrompt(ONE_HOP_CAPITAL_PROMPT.format(state=s.name), s.capital, "one_hop_capital") for s in STATES]
    prompts += [
        EvalPrompt(ONE_HOP_STATE_PROMPT.format(city=c), s.name, "one_hop_state") for s in STATES for c in s.cities
    ]
    prompts += [
        EvalPrompt(TWO_HOP_PROMPT.format(city=c), STATE_OF_CITY[c].capital, "two_hop") for c in trained_two_hop_cities()
    ]
    prompts += [
        EvalPrompt(TWO_HOP_PROMPT.format(city=c), STATE_OF_CITY[c].capital, "two_hop_held_out")
        for c in held_out_cities()
    ]
    return prompts


def generate_documents(n_documents: int, seed: int = 0, sentences_per_document: int = 4) -> list[str]:
    """Documents of a few sentences each, drawn with replacement; two-hop sentences are
    drawn as often as one-hop ones so both kinds of fact are learned."""
    rng = random.Random(seed)
    one_hop = one_hop_sentences()
    two_hop = two_hop_sentences(trained_two_hop_cities())
    docs = []
    for _ in range(n_documents):
        pool = [rng.choice(one_hop if rng.random() < 0.5 else two_hop) for _ in range(sentences_per_document)]
        docs.append(" ".join(pool))
    return docs
