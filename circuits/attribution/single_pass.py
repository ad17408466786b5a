"""Every row of a small graph in one walk down the layers: the feature and logit targets together,
with fewer, larger operations than `Sources.rows` takes batch by batch.

The rows R = [features (by layer), logits] are ordered by the layer t where each one's gradient
starts (a feature's own layer, L for the logits), so that below layer l the rows still walking are
a suffix. Walking down from the top, at each layer l:
1. the gradient at mlp_out[l] of the rows with t > l meets the sources writing there (slot l: the
   features of layers <= l that write to l and the error nodes of layer l, `SlotSources`): one
   product per position over the sources there, added into the rows' edges by node index;
2. the skip path of layer l (if any), then the rows of layer l start, each at its position;
3. the frozen attention of layer l sends the gradient of the rows with t >= l to resid_pre[l]: the
   rows whose gradient is still a short sum of terms (`Replacement.attention_backward_terms`; rows
   that start at layer l are one term) a group at a time while that is cheaper, the others in one
   dense pass over the positions each row sees.
At resid_mid[0] the embedding edges are one product per position with the images of the tokens it
sees (`Replacement.embedding_images`; without them the gradient passes layer 0 too and meets the
embeddings at resid_pre[0]). Rows walk in runs of `AttributionConfig.work_floats` gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from circuits.attribution.replacement import Replacement


class SlotSources:
    """The sources writing to each slot (transcoder output layer) l, ordered by position: the
    features of layers <= l that write to l and the error nodes of layer l. `vectors[l][p]` [d, k_p]
    what those at position p write there (decoder row times activation, or the error), `nodes[l]`
    [k_l] their node indices (features, then errors n + l * P + p) in that order. With the
    embeddings' images (`Replacement.embedding_images`), `images[q]` [d, q + 1] what each token
    k <= q adds at resid_mid[0] of position q, `keys` their token indices in that order."""

    def __init__(self, rep: Replacement, embed_images: torch.Tensor | None):
        L, P = rep.n_layers, rep.n_pos
        n, device = len(rep.features), rep.embed.device
        pos = rep.features[:, 1]
        starts = [0] + torch.tensor([len(w) for w in rep.writes]).cumsum(0).tolist()
        positions = torch.arange(P, device=device)
        self.vectors: list[list[torch.Tensor]] = []
        self.nodes: list[torch.Tensor] = []
        for l in range(L):
            writing = [s for s in range(l + 1) if l - s < rep.writes[s].shape[1]]  # per-layer: s == l only
            vectors = torch.cat([rep.writes[s][:, l - s] for s in writing] + [rep.errors[l]])
            nodes = [torch.arange(starts[s], starts[s + 1], device=device) for s in writing]
            nodes = torch.cat(nodes + [n + l * P + positions])
            where = torch.cat([pos[nodes[:-P]], positions])
            order, sizes = where.argsort(stable=True), torch.bincount(where, minlength=P).tolist()
            self.vectors.append(list(vectors[order].T.split(sizes, 1)))
            self.nodes.append(nodes[order])
        # the embeddings' images at resid_mid[0] by query position: [d, q + 1] for the keys k <= q
        self.images = None if embed_images is None else [embed_images.view(P, P, -1)[: q + 1, q].T for q in range(P)]
        self.keys = torch.cat([positions[: q + 1] for q in range(P)])


def every_row(
    rep: Replacement,
    logit_vectors: torch.Tensor,
    out: list[torch.Tensor],
    embed_images: torch.Tensor | None,
    backward_terms: bool = True,
    work_floats: int = 2**22,
) -> None:
    """The rows of every feature and logit target: `logit_vectors` [T, d] the logits' gradients at
    the final residual stream (last position); written into out[0] [n, n_sources] (the features')
    and out[1] [T, n_sources] (the logits'), in the graph's column order (features, errors, tokens).
    The rows walk in runs whose gradients hold about `work_floats` numbers: buffers that the heap
    reuses from run to run rather than fresh memory the OS must map on every call."""
    L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
    layer, pos = rep.features[:, 0], rep.features[:, 1]
    n, T, device = len(layer), len(logit_vectors), logit_vectors.device
    vectors = torch.cat([feature_vectors(rep), logit_vectors])  # [R, d]
    layers = torch.cat([layer, torch.full((T,), L, device=device)])
    pos = torch.cat([pos, torch.full((T,), P - 1, device=device)])
    slots, step = SlotSources(rep, embed_images), max(1, work_floats // (P * d))
    for a in range(0, n + T, step):
        b = min(a + step, n + T)
        edges, tokens = _walk(rep, slots, vectors[a:b], layers[a:b], pos[a:b], backward_terms)
        k = edges.shape[1]
        for dest, first in ((out[0], 0), (out[1], n)):  # its rows first, first + 1, ... of R
            lo, hi = max(a, first), min(b, first + len(dest))
            if hi > lo:
                dest[lo - first : hi - first, :k] = edges[lo - a : hi - a]
                dest[lo - first : hi - first, k:] = tokens[lo - a : hi - a]


def feature_vectors(rep: Replacement) -> torch.Tensor:
    """Each active feature's encoder row as a gradient at resid_mid of its layer [n, d] (folded
    through the frozen input norm where the transcoder reads after it)."""
    layer, pos, feature = rep.features.T
    W = rep.clt.W_enc.detach()[layer, feature]
    if rep.mlp_in is None:
        return W
    return torch.cat([rep.encoder_vectors(l, pos[layer == l], W[layer == l]) for l in range(rep.n_layers)])


def _walk(
    rep: Replacement,
    slots: SlotSources,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    pos: torch.Tensor,
    backward_terms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges into R targets: `vectors` [R, d] each one's gradient where it starts, at `pos` [R]
    of resid_mid of `layers` [R] (L: the final residual stream), rows ordered by layer. Returns the
    edges from features and errors [R, n + L * P] and from the tokens [R, P]."""
    L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
    R, rows = len(vectors), torch.arange(len(vectors), device=vectors.device)
    start = torch.searchsorted(layers, torch.arange(L + 2, device=layers.device)).tolist()  # t: start[t]:start[t + 1]
    edges = vectors.new_zeros(R, len(rep.features) + L * P)  # from the features and errors
    g = vectors.new_zeros(R, P, d)  # the gradient at the residual stream, walking down
    seen = torch.arange(P, device=pos.device) <= pos[:, None]  # [R, P]: the positions each row sees
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows of layer t -> their gradient as terms
    for l in range(L, -1, -1):
        if l < L:  # slot l: the rows with t > l meet the sources writing to mlp_out[l]
            below = start[l + 1]
            out = g[below:] if rep.mlp_post is None else rep.mlp_post[l].backward(g[below:])
            _contract(slots, l, out, edges[below:])
            if rep.clt.W_skip is not None:
                g[below:] += rep.skip_backward(l, g[below:])
                terms = {t: rep.skip_terms(l, *tw) for t, tw in terms.items()}
        fresh = slice(start[l], start[l + 1])
        if start[l + 1] > start[l]:
            g[rows[fresh], pos[fresh]] = vectors[fresh]
            weights = torch.zeros(start[l + 1] - start[l], P, 1, dtype=g.dtype, device=g.device)
            weights[rows[fresh] - start[l], pos[fresh]] = 1.0
            terms[l] = (vectors[fresh, None], weights)
        if l == L or (l == 0 and slots.images is not None):
            continue
        _attention(rep, l, g, terms, start, seen, backward_terms)
    if slots.images is None:
        tokens = (g * rep.embed).sum(-1)
    else:  # one product per position q with the images of the tokens k <= q
        products = torch.cat([g[:, q] @ images for q, images in enumerate(slots.images)], 1)
        tokens = g.new_zeros(R, P).index_add_(1, slots.keys, products)
    return edges, tokens


def _attention(
    rep: Replacement,
    l: int,
    g: torch.Tensor,
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]],
    start: list[int],
    seen: torch.Tensor,
    backward_terms: bool,
) -> None:
    """Add to g [R, P, d] (the gradient at resid_mid[l] of the rows from start[l] on) what passes back
    through the frozen attention of layer l: as terms for the groups in `terms` (rows of layer t,
    lowest t first) while that is cheaper than the dense pass over the positions their rows see
    (`seen` [R, P]), updating or dropping their terms; densely for the rest."""
    dense = start[l]  # the rows from here on pass densely
    for t in sorted(terms):
        rows = slice(start[t], start[t + 1])
        positions = int(seen[rows].sum(1).float().mean().ceil())  # per row in the dense pass
        if backward_terms and dense == start[t] and rep.terms_are_cheaper(terms[t][0].shape[1], positions):
            through, images, mixed = rep.attention_backward_terms(l, *terms[t])
            g[rows] += through
            dense = start[t + 1]
            if rep.terms_are_cheaper(terms[t][0].shape[1] + images.shape[1], positions):
                terms[t] = (torch.cat([terms[t][0], images], 1), torch.cat([terms[t][1], mixed], 2))
                continue
        del terms[t]
    if dense < len(g):
        sees = seen[dense:].flatten()
        at = sees.nonzero()[:, 0] if sees.float().mean() < 0.8 else None
        g[dense:] += rep.attention_backward(l, g[dense:], at)


def _contract(slots: SlotSources, l: int, g: torch.Tensor, edges: torch.Tensor) -> None:
    """Add the edges from the sources of slot l to rows whose gradient at its output is g [R', P, d]
    into edges [R', n + L * P]: one product per position, g[:, p] @ W_p [d, k_p]."""
    edges.index_add_(1, slots.nodes[l], torch.cat([g[:, p] @ W for p, W in enumerate(slots.vectors[l])], 1))
