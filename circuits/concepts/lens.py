"""Concept traces: where a concept appears in the residual stream, layer by layer and position by position.

The logit lens reads the residual stream after `layer` blocks (row 0 = embeddings, row L = the
final residual) through the final norm and the unembedding. A concept is a word or a group of
words ("some state"); a group scores the probability that the next token is any of its words.
Multi-hop paths (Dallas -> Texas -> Austin) are scored from each concept's peak cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformer_lens import ActivationCache, HookedTransformer

from circuits.demo.facts import CAPITALS, CITIES, STATE_NAMES
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens

# Named groups usable as a concept (`@states`): the demo world's categories.
GROUPS: dict[str, tuple[str, ...]] = {"states": STATE_NAMES, "capitals": CAPITALS, "cities": CITIES}


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


def make_concept(model: HookedTransformer, spec: str | list[str] | tuple[str, list[str]]) -> Concept:
    """A concept from `"Texas"`, `"@states"` (a named group), `"name=w1|w2"`, a list of words or (name, words)."""
    if isinstance(spec, tuple):
        name, words = spec
    elif isinstance(spec, list):
        name, words = "|".join(spec), spec
    elif spec.startswith("@"):
        if spec[1:] not in GROUPS:
            raise CircuitsError(f"unknown concept group {spec!r}: use one of {', '.join('@' + g for g in GROUPS)}")
        name, words = spec[1:], list(GROUPS[spec[1:]])
    elif "=" in spec:
        name, _, rest = spec.rpartition("=")
        words = rest.split("|")
    else:
        name, words = spec, [spec]
    if not words:
        raise CircuitsError(f"concept {name!r} has no words: pass at least one")
    return Concept(name.strip(), tuple(w.strip() for w in words), tuple(word_tokens(model, w) for w in words))


def residual_stack(cache: ActivationCache, n_layers: int) -> torch.Tensor:
    """The residual stream after 0..L blocks: [L+1, batch, pos, d_model]."""
    rows = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(n_layers)]
    return torch.stack([*rows, cache[f"blocks.{n_layers - 1}.hook_resid_post"]])


@torch.no_grad()
def logit_lens(model: HookedTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, ActivationCache]:
    """Lens logits [L+1, pos, vocab] of one prompt (row L equals the model's own logits) and the cache."""
    _, cache = model.run_with_cache(tokens)
    stack = residual_stack(cache, model.cfg.n_layers)[:, 0]  # [L+1, pos, d_model]
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
    model: HookedTransformer, prompt: str, concepts: list, full_sequence: bool = False
) -> tuple[list[ConceptTrace], torch.Tensor]:
    """Traces of every concept spec (see `make_concept`) on a prompt, and the lens logits [L+1, pos, vocab]."""
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    made = [c if isinstance(c, Concept) else make_concept(model, c) for c in concepts]
    return [trace_concept(model, tokens, lens, cache, c, full_sequence) for c in made], lens


@dataclass
class PathScore:
    """How well a chain of concepts (a -> b -> c) shows up in the traces, peak by peak."""

    path: tuple[str, ...]
    peaks: list[tuple[int, int]]  # (layer, position) per hop
    peak_probs: list[float]
    peak_ranks: list[int]
    ordered_by_position: bool
    ordered_by_layer: bool
    completeness: float  # fraction of hops whose peak ranks within `top_k`
    strength: float  # geometric mean of the peak probabilities
    baseline: float  # strength * completeness, halved when out of order
    score: float  # continuous: rank-and-probability strength times a soft order factor
    order_factor: float = field(default=1.0)

    @property
    def in_order(self) -> bool:
        return self.ordered_by_position and self.ordered_by_layer


def score_path(
    traces: dict[str, ConceptTrace], path: list[str], n_layers: int, top_k: int = 5, temperature: float = 0.1
) -> PathScore:
    """Score one path of concept names (each must have a trace)."""
    missing = [name for name in path if name not in traces]
    if missing or len(path) < 2:
        raise CircuitsError(f"path {path} needs at least two concepts, each traced (missing {missing})")
    hops = [traces[name] for name in path]
    peaks = [t.peak() for t in hops]
    probs, ranks = zip(*(t.peak_prob_rank() for t in hops), strict=True)
    n_pos = hops[0].prob.shape[1]
    pairs = list(zip(peaks, peaks[1:], strict=False))
    by_position = all(b[1] >= a[1] for a, b in pairs)
    by_layer = all(b[0] >= a[0] for a, b in pairs)
    # The soft order: how much later (in position and in layer, each scaled to [-1, 1]) each hop peaks.
    margins = [(b[1] - a[1]) / max(1, n_pos - 1) + (b[0] - a[0]) / n_layers for a, b in pairs]
    order_factor = sum(torch.sigmoid(torch.tensor(m / temperature)).item() for m in margins) / len(margins)
    strength = math.exp(sum(math.log(max(p, 1e-30)) for p in probs) / len(probs))
    hop_strength = [0.5 * p + 0.5 / r for p, r in zip(probs, ranks, strict=True)]
    completeness = sum(r <= top_k for r in ranks) / len(ranks)
    return PathScore(
        path=tuple(path),
        peaks=peaks,
        peak_probs=list(probs),
        peak_ranks=list(ranks),
        ordered_by_position=by_position,
        ordered_by_layer=by_layer,
        completeness=completeness,
        strength=strength,
        baseline=strength * completeness * (1.0 if by_position and by_layer else 0.5),
        score=math.exp(sum(math.log(h) for h in hop_strength) / len(hop_strength)) * order_factor,
        order_factor=order_factor,
    )


def rank_paths(traces: dict[str, ConceptTrace], paths: list[list[str]], n_layers: int) -> list[PathScore]:
    """Every path scored, best (highest continuous score) first."""
    return sorted((score_path(traces, p, n_layers) for p in paths), key=lambda s: -s.score)


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


def graph_node_row(layer: str | int, n_layers: int) -> int:
    """The trace row where a graph node's output lands: embeddings ("E") row 0; a feature or error
    node of layer l writes the MLP output of block l, so row l+1; logit nodes the last row."""
    if str(layer) == "E":
        return 0
    return min(int(layer) + 1, n_layers)


def graph_nodes_by_cell(nodes: list[dict], n_layers: int) -> dict[tuple[int, int], list[str]]:
    """Map each trace cell (row, position) to the ids of graph nodes there. Nodes are dicts with `layer`
    ("E" or a layer number) and `ctx_idx` (circuit-tracer/Neuronpedia graph JSON), and `node_id`
    (default `{layer}_{feature}_{ctx_idx}`)."""
    cells: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        node_id = node.get("node_id", f"{node['layer']}_{node.get('feature', 0)}_{node['ctx_idx']}")
        cells.setdefault((graph_node_row(node["layer"], n_layers), int(node["ctx_idx"])), []).append(node_id)
    return cells
