"""Categories: named groups of words that the caller knows, e.g. {"states": ["Alabama", ...], ...}.

The library has none of its own (the demo world passes its cities, states and capitals). A category
is a concept (`@states`: the next token is any state) and a source of counterfactuals: the prompt
with one member swapped for another of the same category (Dallas -> Chicago).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def parse_group(spec: str) -> tuple[str, list[str]]:
    """("name", [words]) from "NAME=w1|w2|w3" (the `--group` option)."""
    name, sep, rest = spec.partition("=")
    words = [w.strip() for w in rest.split("|") if w.strip()]
    if not sep or not name.strip() or not words:
        raise CircuitsError(f"group {spec!r} is not NAME=word1|word2: name it and list its words")
    return name.strip(), words


def read_vocabulary(path: Path) -> dict[str, list[str]]:
    """Named groups from a file: a JSON object {"name": ["word", ...]}, or (any other suffix) one group a
    line as NAME=w1|w2, blank lines and lines starting with # skipped."""
    path = Path(path)
    if not path.is_file():
        raise CircuitsError(f"vocabulary file {path} does not exist: pass a JSON object or NAME=w1|w2 lines")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        lines = [line.strip() for line in text.splitlines()]
        return dict(parse_group(line) for line in lines if line and not line.startswith("#"))
    try:
        groups = json.loads(text)
    except json.JSONDecodeError as e:
        raise CircuitsError(f"{path} is not valid JSON ({e}): write an object of word lists") from None
    if not isinstance(groups, dict) or not all(
        isinstance(ws, list) and ws and all(isinstance(w, str) for w in ws) for ws in groups.values()
    ):
        raise CircuitsError(f'{path} must be a JSON object of non-empty word lists, e.g. {{"states": ["Texas"]}}')
    return {str(k): list(v) for k, v in groups.items()}
