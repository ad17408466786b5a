"""Logit targets of an attribution graph: the most likely next tokens, named tokens, or logit differences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.models import token_strings


@dataclass
class LogitTarget:
    name: str
    token: int  # vocabulary id; d_vocab + k for the k-th virtual target (a logit difference)
    weights: torch.Tensor  # [d_vocab]: the target's input is logits @ weights (demeaned one-hot, or e_a - e_b)
    prob: float


def token_id(model: HookedTransformer, text: str) -> int:
    """The id of a single vocabulary token, tried as given and with a leading space."""
    tok = model.tokenizer
    for candidate in (text, " " + text.lstrip()):
        ids = tok.encode(candidate, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tok.unk_token_id:
            return ids[0]
    raise CircuitsError(f"target {text!r} is not a single token of the vocabulary: pass a token the model knows")


def resolve_targets(
    model: HookedTransformer,
    logits: torch.Tensor,
    names: list[str],
    target_probability: float = 0.95,
    max_targets: int = 10,
) -> list[LogitTarget]:
    """The logit targets for logits [d_vocab] of the last position: named ones, or by default the
    most likely tokens covering `target_probability` (at most `max_targets`)."""
    V = logits.shape[-1]
    probs = logits.softmax(-1)

    def one_hot(t: int, offset: float = 0.0) -> torch.Tensor:  # [d_vocab]: no V x V identity
        w = torch.full_like(logits, offset)
        w[t] += 1.0
        return w

    def single(t: int, name: str | None = None) -> LogitTarget:
        name = model.tokenizer.decode([t]) if name is None else name
        return LogitTarget(name, t, one_hot(t, -1.0 / V), probs[t].item())

    if not names:
        top = probs.topk(min(max_targets, V))
        n = int((top.values.cumsum(0) < target_probability).sum()) + 1
        ids = top.indices[: min(n, max_targets)].tolist()
        return [single(t, name) for t, name in zip(ids, token_strings(model.tokenizer, ids), strict=True)]
    targets = []
    for name in names:
        if "-" in name.strip("-") and not _is_token(model, name):
            a, b = (token_id(model, part.strip()) for part in name.split("-", 1))
            label = f"{model.tokenizer.decode([a])} - {model.tokenizer.decode([b])}"
            targets.append(LogitTarget(label, V + len(targets), one_hot(a) - one_hot(b), 1.0))
        else:
            targets.append(single(token_id(model, name)))
    return targets


def _is_token(model: HookedTransformer, text: str) -> bool:
    try:
        token_id(model, text)
    except CircuitsError:
        return False
    return True
