"""Concept traces: where a concept appears in the residual stream, layer by layer and position by position.

The logit lens reads the residual stream after `layer` blocks (row 0 = embeddings, row L = the
final residual) through the final norm and the unembedding. A concept is a word or a group of
words ("some state"); a group scores the probability that the next text is any of its words. A word
of several tokens is scored by its first token, or where that token says nothing of it (shared with
another traced word, or blank, as a bare space in byte-level BPE), by its whole token sequence: the
first token through the lens, the rest teacher-forced through the model's own later positions.
Named groups (`@states`) come from the caller's categories (`circuits.concepts.categories`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformer_lens import ActivationCache, HookedTransformer

from circuits.concepts.categories import Categories, category_words
from circuits.concepts.words import spaced_vocabulary, starts_word
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    """A word or a group of words; each word is a token sequence."""

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
    """Scores of one concept at every (layer, position); layer rows 0..L as in `logit_lens`.

    A word is scored by its first token through the lens, times, for a word scored whole (see
    `whole_words`), the model's own probability of the rest of its tokens teacher-forced after it."""

    concept: Concept
    prob: torch.Tensor  # [L+1, pos]
    logprob: torch.Tensor  # [L+1, pos]
    rank: torch.Tensor  # [L+1, pos], 1 = the top token (a group: its best word; see `scored_ranks`)
    logit: torch.Tensor  # [L+1, pos], a group: logsumexp of its words' (whole-sequence) logits
    attn_direct: torch.Tensor  # [L, pos] direct contribution of each layer's attention output to the first tokens
    mlp_direct: torch.Tensor  # [L, pos] ... and of each layer's MLP output
    whole: tuple[bool, ...] = ()  # per word: scored by its whole token sequence
    anchor: tuple[int, int] | None = None  # first and last position of the word's tokens in the prompt

    @property
    def anchor_position(self) -> int | None:
        """Where a word of the prompt is complete: its last token (None when the concept is not in the prompt)."""
        return None if self.anchor is None else self.anchor[1]

    def peak(self) -> tuple[int, int]:
        """(layer, position) of the highest probability; a prompt word is anchored at (0, its last token)."""
        if self.anchor_position is not None:
            return 0, self.anchor_position
        flat = int(self.prob.flatten().argmax())
        return divmod(flat, self.prob.shape[1])

    def peak_prob_rank(self) -> tuple[float, int]:
        if self.anchor_position is not None:
            return 1.0, 1
        layer, pos = self.peak()
        return float(self.prob[layer, pos]), int(self.rank[layer, pos])


def whole_words(
    concepts: list[Concept], model: HookedTransformer, full_sequence: bool = False
) -> tuple[set[tuple[int, ...]], list[str]]:
    """The words (token sequences) to score whole: with `full_sequence` every multi-token word; else the
    multi-token words whose first token says nothing of them, because another traced word starts with it
    too or it is only spaces or punctuation. Also the warnings (logged too) naming such words and the fix."""
    words = {ids for c in concepts for ids in c.token_ids}
    starts: dict[int, list[tuple[int, ...]]] = {}
    for ids in words:
        starts.setdefault(ids[0], []).append(ids)
    whole, notes = set(), []
    for first, group in starts.items():
        text = model.to_single_str_token(first)
        blank = not any(ch.isalnum() for ch in text)
        shared = [ids for ids in group if len(ids) > 1 and (full_sequence or blank or len(group) > 1)]
        if shared and not full_sequence:
            names = ", ".join(sorted(repr(model.tokenizer.decode(ids).strip()) for ids in shared))
            why = "is shared" if len(group) > 1 else "is not a word"
            notes.append(
                f"{names}: the first token {text!r} {why}, so each is scored by its whole token sequence (the "
                "first token by the lens, the rest teacher-forced); trace a distinguishing word instead, or pass "
                "--full-sequence to score every multi-token word this way"
            )
            log.warning(notes[-1])
        whole.update(shared)
    return whole, notes


@torch.no_grad()
def rest_logprob(model: HookedTransformer, tokens: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """log P(ids[1:] | the prompt up to p, then ids[0]) by the model itself, per position p: [pos].
    One batch of prompt prefixes, each followed by the word and right-padded (causal: padding after a
    position cannot change it)."""
    n_pos, k = tokens.shape[1], len(ids)
    if k == 1:
        return torch.zeros(n_pos)
    word = torch.tensor(ids, dtype=tokens.dtype, device=tokens.device)
    batch = tokens.new_full((n_pos, n_pos + k - 1), int(ids[-1]))
    for p in range(n_pos):
        batch[p, : p + 1] = tokens[0, : p + 1]
        batch[p, p + 1 : p + k] = word[:-1]
    logprobs = model(batch).log_softmax(-1)  # [pos, pos + k - 1, vocab]
    steps = torch.arange(n_pos)[:, None] + torch.arange(1, k)  # [pos, k - 1]: where ids[1:] are predicted
    rows = torch.arange(n_pos)[:, None].expand(-1, k - 1)
    return logprobs[rows, steps, word[1:].expand(n_pos, -1)].sum(-1).cpu()


def word_anchor(model: HookedTransformer, tokens: torch.Tensor, word: str) -> tuple[int, int] | None:
    """(first, last) position of the word's tokens in the prompt (after BOS; mid-sentence or at the start),
    or None."""
    seq = tokens[0].tolist()
    for text in (" " + word, word):
        ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
        for start in range(1, len(seq) - len(ids) + 1):
            if seq[start : start + len(ids)] == ids:
                return start, start + len(ids) - 1
    return None


@torch.no_grad()
def trace_concept(
    model: HookedTransformer,
    tokens: torch.Tensor,
    lens: torch.Tensor,
    cache: ActivationCache,
    concept: Concept,
    whole: set[tuple[int, ...]] | None = None,
) -> ConceptTrace:
    """One concept's trace from the lens logits [L+1, pos, vocab] and cache of `tokens` [1, pos]; the words
    in `whole` (see `whole_words`) are scored by their whole token sequence."""
    words = list(dict.fromkeys(concept.token_ids))  # a word listed twice counts once
    whole = whole or set()
    first = torch.tensor([ids[0] for ids in words])
    # Each word's logit: its first token's, plus log P(rest) for a word scored whole. [L+1, pos, words]
    rest = torch.stack([rest_logprob(model, tokens, ids if ids in whole else ids[:1]) for ids in words], -1)
    word_logits = lens[..., first] + rest
    logprob = (word_logits - lens.logsumexp(-1, keepdim=True)).logsumexp(-1)
    attn = torch.stack([cache[f"blocks.{l}.hook_attn_out"][0] for l in range(model.cfg.n_layers)])
    mlp = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(model.cfg.n_layers)])
    # A group's direct contribution: each word's, weighted by the gradient of logsumexp (its final share).
    weights = word_logits[-1].softmax(-1)  # [pos, words]
    single = len(concept.words) == 1
    return ConceptTrace(
        concept=concept,
        prob=logprob.exp(),
        logprob=logprob,
        rank=scored_ranks(lens, word_logits, first).min(-1).values,
        logit=word_logits.logsumexp(-1),
        attn_direct=(direct_logits(model, cache, attn, first.tolist()) * weights).sum(-1),
        mlp_direct=(direct_logits(model, cache, mlp, first.tolist()) * weights).sum(-1),
        whole=tuple(ids in whole for ids in concept.token_ids),
        anchor=word_anchor(model, tokens, concept.words[0]) if single else None,
    )


def scored_ranks(lens: torch.Tensor, word_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Rank [L+1, pos, words] of each word's logit among the lens's single tokens, its own first token left
    out (for a one-token word: its token's rank, 1 = the top token)."""
    # 1 + the number of logits above: from the count of logits at or below, by binary search.
    at_or_below = torch.searchsorted(lens.sort(-1).values, word_logits.contiguous(), right=True)
    above = lens.shape[-1] - at_or_below
    return above + 1 - (lens[..., first] > word_logits).long()


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
    whole, _ = whole_words(made, model, full_sequence)
    return [trace_concept(model, tokens, lens, cache, c, whole) for c in made], lens


def propose_intermediates(model: HookedTransformer, tokens: torch.Tensor, lens: torch.Tensor, k: int = 3) -> list[str]:
    """Words by their highest logit-lens probability over the prompt's cells, best first; only tokens that
    begin a word (see `starts_word`), and neither the prompt's own tokens nor the model's final prediction.

    Left out: the embeddings (row 0: the input, not a concept), the first position (it sees no context:
    its lens is the model's prior, e.g. "The" after BOS) and the answer's own cell (output row, last
    position). The output row at earlier positions stays: what the model predicts after "Dallas is in" is
    an intermediate concept ("Texas"), and leaving the whole row out left only answer-like tokens peaking
    in the middle (a competing capital) for prompts whose intermediate the model states outright."""
    probs = lens.softmax(-1)  # [L+1, pos, vocab]
    probs[0], probs[:, 0], probs[-1, -1] = 0, 0, 0
    score = probs.flatten(0, 1).max(0).values  # [vocab]
    excluded = set(tokens[0].tolist()) | {int(lens[-1, -1].argmax())}
    excluded |= {i for i in (model.tokenizer.unk_token_id, model.tokenizer.pad_token_id) if i is not None}
    score[list(excluded)] = 0
    spaced = spaced_vocabulary(model)
    texts = model.tokenizer.batch_decode([[i] for i in range(lens.shape[-1])])
    score[torch.tensor([not starts_word(t, spaced) for t in texts])] = 0
    top = score.topk(k)
    return [model.to_single_str_token(int(i)).strip() for v, i in zip(top.values, top.indices, strict=True) if v > 0]
