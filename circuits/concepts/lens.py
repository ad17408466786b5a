"""Concept traces: where a concept appears in the residual stream, layer by layer and position by position.

The logit lens reads the residual stream after `layer` blocks (row 0 = embeddings, row L = the
final residual) through the final norm and the unembedding. A concept is a word or a group of
words ("some state"); a group scores the probability that the next token is any of its words.
Named groups (`@states`) come from the caller's categories (`circuits.concepts.categories`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import ActivationCache, HookedTransformer

from circuits.concepts.categories import Categories, category_words
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens


@dataclass(frozen=True)
class Concept:
    """A word or a group of words; each word is a token sequence (scored by its first token)."""

    name: str
    words: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]  # one token sequence per word

    @property
    def first_tokens(self) -> list[int]:
        return [ids[0] for ids in self.token_ids]


def word_tokens(model: HookedTransformer, word: str) -> tuple[int, ...]:
    """Token ids of a word as it appears mid-sentence (after a space)."""
    ids = model.to_tokens(" " + word.strip(), prepend_bos=False)[0].tolist()
    unk = model.tokenizer.unk_token_id
    if not word.strip() or (unk is not None and unk in ids):
        raise CircuitsError(f"concept {word!r} is not in the model's vocabulary: pick a word the model knows")
    return tuple(ids)


def make_concept(
    model: HookedTransformer, spec: str | list[str] | tuple[str, list[str]], categories: Categories | None = None
) -> Concept:
    """A concept from `"Texas"`, `"@states"` (a category of `categories`), `"name=w1|w2"`, a list of words
    or (name, words)."""
    if isinstance(spec, tuple):
        name, words = spec
    elif isinstance(spec, list):
        name, words = "|".join(spec), spec
    elif spec.startswith("@"):
        name, words = spec[1:], category_words(categories, spec[1:])
    elif "=" in spec:
        name, _, rest = spec.rpartition("=")
        words = rest.split("|")
    else:
        name, words = spec, [spec]
    if not words:
        raise CircuitsError(f"concept {name!r} has no words: pass at least one")
    return Concept(name.strip(), tuple(w.strip() for w in words), tuple(word_tokens(model, w) for w in words))


@torch.no_grad()
def logit_lens(model: HookedTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, ActivationCache]:
    """Lens logits [L+1, pos, vocab] of one prompt (row L equals the model's own logits) and the cache."""
    _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid()[:, 0]  # [L+1, pos, d_model]: resid_pre of each block, the last resid_post
    return model.unembed(model.ln_final(stack)), cache


def direct_logits(
    model: HookedTransformer, cache: ActivationCache, x: torch.Tensor, ids: list[int] | None = None
) -> torch.Tensor:
    """Direct contribution of a component output x [..., pos, d_model] to the logits of `ids` (default all)
    [..., pos, len(ids)]: through the final norm frozen at its scale on this prompt, without biases, so the
    contributions of all components add up to the logits minus biases."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if model.cfg.normalization_type is not None:
        x = x / cache["ln_final.hook_scale"][0]  # [pos, 1]
    if hasattr(model.ln_final, "w"):
        x = x * model.ln_final.w
    return x @ (model.W_U if ids is None else model.W_U[:, ids])


@dataclass
class ConceptTrace:
    """Scores of one concept at every (layer, position); layer rows 0..L as in `logit_lens`."""

    concept: Concept
    prob: torch.Tensor  # [L+1, pos]
    logprob: torch.Tensor  # [L+1, pos]
    rank: torch.Tensor  # [L+1, pos], 1 = the top token (a group: its best word)
    logit: torch.Tensor  # [L+1, pos], a group: logsumexp of its words' logits
    attn_direct: torch.Tensor  # [L, pos] direct logit contribution of each layer's attention output
    mlp_direct: torch.Tensor  # [L, pos] ... and of each layer's MLP output
    sequence_logprob: torch.Tensor | None = None  # [L+1] log P(all tokens of the word) at the last position
    anchor_position: int | None = None  # where the concept is a token of the prompt (first occurrence)

    def peak(self) -> tuple[int, int]:
        """(layer, position) of the highest probability; a prompt token is anchored at (0, its position)."""
        if self.anchor_position is not None:
            return 0, self.anchor_position
        flat = int(self.prob.flatten().argmax())
        return divmod(flat, self.prob.shape[1])

    def peak_prob_rank(self) -> tuple[float, int]:
        if self.anchor_position is not None:
            return 1.0, 1
        layer, pos = self.peak()
        return float(self.prob[layer, pos]), int(self.rank[layer, pos])


@torch.no_grad()
def trace_concept(
    model: HookedTransformer,
    tokens: torch.Tensor,
    lens: torch.Tensor,
    cache: ActivationCache,
    concept: Concept,
    full_sequence: bool = False,
) -> ConceptTrace:
    """One concept's trace from the lens logits [L+1, pos, vocab] and cache of `tokens` [1, pos]."""
    ids = torch.tensor(sorted(set(concept.first_tokens)))  # words sharing a first token count once
    logprobs = lens.log_softmax(-1)  # [L+1, pos, vocab]
    member_logits = lens[..., ids]  # [L+1, pos, words]
    # rank = 1 + the number of logits above: from the count of logits at or below, by binary search.
    at_or_below = torch.searchsorted(lens.sort(-1).values, member_logits.contiguous(), right=True)
    ranks = lens.shape[-1] - at_or_below + 1  # [L+1, pos, words]
    logprob = logprobs[..., ids].logsumexp(-1)
    # A group's direct contribution: each word's, weighted by the gradient of logsumexp (its final share).
    weights = logprobs[-1][:, ids].softmax(-1)  # [pos, words]
    attn = torch.stack([cache[f"blocks.{l}.hook_attn_out"][0] for l in range(model.cfg.n_layers)])
    mlp = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(model.cfg.n_layers)])
    after_bos = tokens[0, 1:].tolist()
    single = concept.token_ids[0] if len(concept.token_ids) == 1 and len(concept.token_ids[0]) == 1 else None
    anchor = after_bos.index(single[0]) + 1 if single and single[0] in after_bos else None
    return ConceptTrace(
        concept=concept,
        prob=logprob.exp(),
        logprob=logprob,
        rank=ranks.min(-1).values,
        logit=member_logits.logsumexp(-1),
        attn_direct=(direct_logits(model, cache, attn, ids.tolist()) * weights).sum(-1),
        mlp_direct=(direct_logits(model, cache, mlp, ids.tolist()) * weights).sum(-1),
        sequence_logprob=sequence_logprob(model, tokens, concept) if full_sequence else None,
        anchor_position=anchor,
    )


@torch.no_grad()
def sequence_logprob(model: HookedTransformer, tokens: torch.Tensor, concept: Concept) -> torch.Tensor:
    """Logit-lens log P(the whole word follows the prompt) per layer [L+1]; a group: logsumexp over words."""
    per_word = []
    for ids in concept.token_ids:
        continuation = torch.tensor([ids[:-1]], dtype=tokens.dtype, device=tokens.device)
        extended = torch.cat([tokens, continuation], dim=1)  # [1, pos + k - 1]
        lens, _ = logit_lens(model, extended)
        steps = lens[:, tokens.shape[1] - 1 :].log_softmax(-1)  # [L+1, k, vocab]
        per_word.append(steps[:, torch.arange(len(ids)), torch.tensor(ids)].sum(-1))
    return torch.stack(per_word).logsumexp(0)


def trace_concepts(
    model: HookedTransformer,
    prompt: str,
    concepts: list,
    full_sequence: bool = False,
    categories: Categories | None = None,
) -> tuple[list[ConceptTrace], torch.Tensor]:
    """Traces of every concept spec (see `make_concept`) on a prompt, and the lens logits [L+1, pos, vocab]."""
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    made = [c if isinstance(c, Concept) else make_concept(model, c, categories) for c in concepts]
    return [trace_concept(model, tokens, lens, cache, c, full_sequence) for c in made], lens


def propose_intermediates(model: HookedTransformer, tokens: torch.Tensor, lens: torch.Tensor, k: int = 3) -> list[str]:
    """Words whose logit-lens probability peaks at a middle layer (not the embeddings, not the output),
    best peak first; the prompt's own tokens and the model's final prediction are left out."""
    probs = lens.softmax(-1)  # [L+1, pos, vocab]
    best_per_layer = probs.max(1).values  # [L+1, vocab]
    peak_layer = best_per_layer.argmax(0)  # [vocab]
    middle = (peak_layer > 0) & (peak_layer < lens.shape[0] - 1)
    excluded = set(tokens[0].tolist()) | {int(lens[-1, -1].argmax())}
    excluded |= {i for i in (model.tokenizer.unk_token_id, model.tokenizer.pad_token_id) if i is not None}
    score = torch.where(middle, best_per_layer.max(0).values, torch.zeros(()))
    score[list(excluded)] = 0
    top = score.topk(k)
    return [model.to_single_str_token(int(i)).strip() for v, i in zip(top.values, top.indices, strict=True) if v > 0]
