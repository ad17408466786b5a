"""Prompt variants of the same token length: counterfactuals for patching, and sets for trajectories.

Two sources, both working on any model: the caller's categories (swap one member for another: Dallas ->
Chicago), and, without categories, the model itself: swap one word of the prompt for another whole-word
token that the model ranks high in that slot (its own next-token prediction one position before), of the
same case (a name for a name).
"""

from __future__ import annotations

import re

import torch
from transformer_lens import HookedTransformer

from circuits.concepts.categories import Categories, member_swaps
from circuits.concepts.words import spaced_vocabulary, starts_word
from circuits.models import prompt_tokens


def category_variants(model: HookedTransformer, prompt: str, categories: Categories) -> list[str]:
    """Prompts with one member of a category swapped for another member of the same token length
    (Dallas -> Chicago), in the categories' order; none without categories."""
    n_tokens = prompt_tokens(model, prompt).shape[1]
    return [v for v in member_swaps(prompt, categories) if prompt_tokens(model, v).shape[1] == n_tokens]


def word_slots(model: HookedTransformer, tokens: torch.Tensor) -> list[int]:
    """Positions (after BOS) of the prompt's one-token words: a word start followed by a word start, by
    punctuation or by the end (never a piece of a longer word)."""
    spaced = spaced_vocabulary(model)
    texts = [model.to_single_str_token(int(t)) for t in tokens[0]]
    slots = []
    for pos in range(1, len(texts)):
        ends = pos + 1 == len(texts) or starts_word(texts[pos + 1], spaced) or not texts[pos + 1].strip().isalnum()
        if starts_word(texts[pos], spaced) and ends:
            slots.append(pos)
    return slots


@torch.no_grad()
def slot_swaps(
    model: HookedTransformer, prompt: str, positions: list[int] | None = None, per_slot: int = 8, candidates: int = 64
) -> list[str]:
    """Prompts with the one-token word at each position (default: every word slot, left to right) swapped
    for up to `per_slot` other words the model ranks highest in that slot, of the same case; each variant
    re-tokenises to the same length."""
    tokens = prompt_tokens(model, prompt)
    logits = model(tokens)[0]  # [pos, vocab]
    spaced = spaced_vocabulary(model)
    slots = word_slots(model, tokens)
    variants = []
    for pos in [p for p in (positions or slots) if p in slots]:
        original = model.to_single_str_token(int(tokens[0, pos])).strip()
        found = []
        for candidate in logits[pos - 1].topk(min(candidates, logits.shape[-1])).indices.tolist():
            text = model.to_single_str_token(candidate)
            if candidate != tokens[0, pos] and starts_word(text, spaced) and _same_case(text.strip(), original):
                found.append(_swap(model, prompt, tokens, pos, candidate))
            if sum(v is not None for v in found) == per_slot:
                break
        variants += [v for v in found if v is not None]
    return variants


def _swap(model: HookedTransformer, prompt: str, tokens: torch.Tensor, pos: int, candidate: int) -> str | None:
    """The prompt with its token at `pos` swapped for `candidate`, spelled as the prompt is (or else as the
    tokens decode), if it reads back as exactly those tokens; else None."""
    swapped = tokens.clone()
    swapped[0, pos] = candidate
    original = model.to_single_str_token(int(tokens[0, pos])).strip()
    occurrence = tokens[0, :pos].tolist().count(int(tokens[0, pos]))
    new = model.to_single_str_token(candidate).strip()
    for variant in (_replace_word(prompt, original, new, occurrence), model.tokenizer.decode(swapped[0, 1:])):
        if variant is not None and torch.equal(prompt_tokens(model, variant), swapped):
            return variant
    return None


def _replace_word(prompt: str, word: str, new: str, occurrence: int) -> str | None:
    """The prompt with the `occurrence`-th whole-word `word` replaced by `new`; None when there is no such."""
    found = list(re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt))
    if occurrence >= len(found):
        return None
    m = found[occurrence]
    return prompt[: m.start()] + new + prompt[m.end() :]


def _same_case(a: str, b: str) -> bool:
    return a[:1].isupper() == b[:1].isupper()


@torch.no_grad()
def propose_counterfactuals(
    model: HookedTransformer,
    prompt: str,
    categories: Categories | None = None,
    n: int = 3,
    positions: list[int] | None = None,
) -> list[str]:
    """Up to n same-length variants whose top prediction differs from the prompt's: same-category swaps,
    or without any, the model's own slot swaps (at `positions`, default every word slot)."""
    variants = category_variants(model, prompt, categories or {}) or slot_swaps(model, prompt, positions)
    if not variants:
        return []
    predicted = model(prompt_tokens(model, prompt))[0, -1].argmax()
    changed = model(model.to_tokens(variants))[:, -1].argmax(-1) != predicted  # variants share one length
    return [v for v, c in zip(variants, changed.tolist(), strict=True) if c][:n]


@torch.no_grad()
def answer_groups(model: HookedTransformer, prompt: str, variants: list[str], limit: int) -> list[str]:
    """The prompt and at most `limit` - 1 of its same-length variants, chosen so that answers repeat (what a
    funnel compares): the variants sharing the prompt's answer first, then the other answers shared by two
    or more variants, largest first; then, where room is left, variants whose answer no other prompt gives
    (trajectories to follow, though the funnel leaves them out)."""
    if not variants:
        return [prompt]
    prompts = [prompt, *variants]
    answers = model(model.to_tokens(prompts))[:, -1].argmax(-1).tolist()  # variants share the prompt's length
    groups: dict[int, list[str]] = {}
    for p, a in zip(prompts, answers, strict=True):
        groups.setdefault(a, []).append(p)
    own = groups.pop(answers[0])
    ranked = sorted(groups.values(), key=len, reverse=True)  # stable: first seen first; lone answers last
    return [p for g in [own, *ranked] for p in g][:limit]
