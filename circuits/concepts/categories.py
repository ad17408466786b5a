"""Categories: named groups of words that the caller knows, e.g. {"states": ["Alabama", ...], ...}.

The library has none of its own (the demo world passes its cities, states and capitals). A category
is a concept (`@states`: the next token is any state) and a source of counterfactuals: the prompt
with one member swapped for another of the same category (Dallas -> Chicago).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from circuits.errors import CircuitsError

Categories = Mapping[str, Sequence[str]]  # category name -> member words


def category_words(categories: Categories | None, name: str) -> list[str]:
    """The member words of the category `name` (a concept spec `@name` without its `@`)."""
    categories = categories or {}
    if name not in categories:
        known = ", ".join(f"@{c}" for c in categories) or "none"
        raise CircuitsError(
            f"unknown concept category @{name} (known: {known}): pass categories={{{name!r}: [words]}} "
            f"or spell the group out as {name}=word1|word2"
        )
    return list(categories[name])


def member_swaps(prompt: str, categories: Categories) -> list[str]:
    """The prompt with one whole-word member of a category swapped for each other member of it, in the
    categories' order, then their members' order."""
    swaps = []
    for members in categories.values():
        for word in members:
            pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
            if pattern.search(prompt):
                # A function as the replacement: a member is inserted literally, backslashes and all.
                swaps += [pattern.sub(lambda _, o=other: o, prompt) for other in members if other != word]
    return swaps
