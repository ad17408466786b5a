"""The one error type a user can act on (the CLI prints it as one line and exits 2), and the checks
of user input that raise it before any work: numbers in range, text that is UTF-8, output paths."""

from __future__ import annotations

import math
import os
from pathlib import Path


class CircuitsError(Exception):
    """Bad input or a missing file: the message says what is wrong and what to do."""


def check_range(
    name: str, value: object, low: float, high: float = math.inf, *, integer: bool = False, above: bool = False
) -> None:
    """Refuse, in one line naming `name`, a `value` that is not a finite number (an int with
    `integer`) or lies outside [low, high] (with `above`: (low, high], low itself refused too)."""
    is_number = isinstance(value, int) or (isinstance(value, float) and not integer and math.isfinite(value))
    if isinstance(value, bool) or not is_number or not (low < value if above else low <= value) or not value <= high:
        kind = "an integer" if integer else "a number"
        bounds = f"above {low:g}" if above else f"of at least {low:g}"
        if high != math.inf:
            bounds = f"{bounds}, at most {high:g}" if above else f"between {low:g} and {high:g}"
        raise CircuitsError(f"{name} is {value!r}: pass {kind} {bounds}")


def check_text(what: str, text: str) -> str:
    """`text` if it can be encoded as UTF-8 (a command line or file with other bytes reaches Python
    as lone surrogates, which no tokenizer takes); refuses it in one line naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CircuitsError(
            f"{what} is not valid UTF-8 text (byte {text[e.start].encode('utf-8', 'surrogateescape')!r} "
            f"at character {e.start}): convert it to UTF-8"
        ) from None
    return text


def check_output(path: Path, flag: str = "--out", *, directory: bool = True) -> Path:
    """`path` if an output can be written there (a directory, or with `directory=False` a file);
    refuses before any work, in one line, a file where a directory is wanted or the reverse, a path
    under a file, and a folder this user cannot write into. Creates nothing."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        wanted = "a directory" if directory else "a file name"
        raise CircuitsError(f"{flag} {path} is {'not a directory' if directory else 'a directory'}: pass {wanted}")
    existing = path if directory else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CircuitsError(f"{flag} {path} lies under {existing}, which is not a directory: pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CircuitsError(f"{flag} {path} cannot be written (no permission in {existing}): pass another path")
    return path
