"""Every row of a small graph in one walk down the layers: the feature and logit targets together,
with fewer, larger operations than `Sources.rows` takes batch by batch (short prompts are bound by
the number of torch operations, not by arithmetic).

The rows R = [features (by layer), logits] are ordered by the layer t where each one's gradient
starts (a feature's own layer, L for the logits), so that below layer l the rows still walking are
a suffix. Walking down from the top, at each layer l:
1. the gradient at mlp_out[l] of the rows with t > l meets the sources writing there (slot l): the
   features of layers <= l and the error nodes of layer l, laid out per position in blocks of fixed
   width per source layer (`SlotLayout`), one product batched over positions, accumulated into
   edges [R, P, C];
2. the skip path of layer l (if any), then the rows of layer l start, each at its position;
3. the frozen attention of layer l sends the gradient of the rows with t >= l to resid_pre[l]: the
   rows whose gradient is still a short sum of terms (`Replacement.attention_backward_terms`; rows
   that start at layer l are one term) a group at a time, the others in one dense pass over the
   positions each row sees.
At resid_mid[0] the embedding edges are one product with `Replacement.embedding_images` (without
them the gradient passes layer 0 too and meets the embeddings at resid_pre[0]). One gather from
[R, P, C] into node order gives the rows' edges from features and errors.
"""

from __future__ import annotations

import torch

from circuits.attribution.replacement import Replacement


class SlotLayout:
    """Where the sources of each slot (transcoder output layer) sit in the edges [R, P, C]: per
    position, a block of width `widths[s]` per source layer s holding its features at that
    position (in node order), then its error node. Slot l reads the first `stop[l]` columns, and
    `writes[l]` [P, stop[l], d] holds each source's vector there (decoder row times activation, or
    the error; zero in padding and for features that do not write to l)."""

    def __init__(self, rep: Replacement):
        L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
        n, device = len(rep.features), rep.embed.device
        layer, pos = rep.features[:, 0], rep.features[:, 1]
        counts = torch.zeros(L * P, dtype=torch.long, device=device)
        counts.index_add_(0, layer * P + pos, torch.ones_like(layer))  # features per (layer, position)
        widths = (counts.view(L, P).amax(1) + 1).tolist()  # + 1: the error node
        ends = torch.tensor(widths, device=device).cumsum(0)  # [L] each layer's block ends here
        self.stop, self.C = ends.tolist(), int(ends[-1])
        # node order is (layer, position, feature): a feature's rank in its (layer, position) run
        rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[layer * P + pos]
        column = (ends - torch.tensor(widths, device=device))[layer] + rank  # [n]
        node = torch.full((P, self.C), -1, dtype=torch.long, device=device)
        node[pos, column] = torch.arange(n, device=device)
        node[:, ends - 1] = n + torch.arange(L * P, device=device).view(L, P).T  # error (l, p): n + l * P + p
        flat = node.flatten()
        valid = (flat >= 0).nonzero()[:, 0]
        self.gather = valid[flat[valid].argsort()]  # [n + L * P]: the column of each node in [P * C]
        starts = [0] + torch.tensor([len(w) for w in rep.writes]).cumsum(0).tolist()
        self.writes = []
        for l in range(L):
            W = rep.embed.new_zeros(P, self.stop[l], d)
            for s in range(l + 1):
                if l - s < rep.writes[s].shape[1]:  # a per-layer transcoder writes only to its own layer
                    at = slice(starts[s], starts[s + 1])
                    W[pos[at], column[at]] = rep.writes[s][:, l - s]
            W[:, self.stop[l] - 1] = rep.errors[l]
            self.writes.append(W.transpose(1, 2))  # [P, d, stop[l]]


def every_row(
    rep: Replacement, logit_vectors: torch.Tensor, out: list[torch.Tensor], embed_images: torch.Tensor | None,
    backward_terms: bool = True,
) -> None:
    """The rows of every feature and logit target: `logit_vectors` [T, d] the logits' gradients at
    the final residual stream (last position); written into out[0] [n, n_sources] (the features')
    and out[1] [T, n_sources] (the logits'), in the graph's column order (features, errors, tokens)."""
    L, P = rep.n_layers, rep.n_pos
    layer, pos = rep.features[:, 0], rep.features[:, 1]
    T, device = len(logit_vectors), logit_vectors.device
    vectors = torch.cat([feature_vectors(rep), logit_vectors])  # [R, d]
    layers = torch.cat([layer, torch.full((T,), L, device=device)])
    pos = torch.cat([pos, torch.full((T,), P - 1, device=device)])
    edges, tokens = _walk(rep, vectors, layers, pos, embed_images, backward_terms)
    n, k = len(layer), edges.shape[1]
    for rows, dest in ((slice(0, n), out[0]), (slice(n, n + T), out[1])):
        dest[:, :k] = edges[rows]
        dest[:, k:] = tokens[rows]


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
    vectors: torch.Tensor,
    layers: torch.Tensor,
    pos: torch.Tensor,
    embed_images: torch.Tensor | None,
    backward_terms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges into R targets: `vectors` [R, d] each one's gradient where it starts, at `pos` [R]
    of resid_mid of `layers` [R] (L: the final residual stream), rows ordered by layer. Returns the
    edges from features and errors [R, n + L * P] and from the tokens [R, P]."""
    L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
    R, rows = len(vectors), torch.arange(len(vectors), device=vectors.device)
    start = torch.searchsorted(layers, torch.arange(L + 2, device=layers.device)).tolist()  # rows of layer t: start[t]:start[t + 1]
    layout = SlotLayout(rep)
    edges = vectors.new_zeros(R, P, layout.C)
    g = vectors.new_zeros(R, P, d)  # the gradient at the residual stream, walking down
    seen = torch.arange(P, device=pos.device) <= pos[:, None]  # [R, P]: the positions each row sees
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows of layer t -> their gradient as terms
    for l in range(L, -1, -1):
        if l < L:  # slot l: the rows with t > l meet the sources writing to mlp_out[l]
            below = start[l + 1]
            out = g[below:] if rep.mlp_post is None else rep.mlp_post[l].backward(g[below:])
            edges[below:, :, : layout.stop[l]].transpose(0, 1).baddbmm_(out.transpose(0, 1), layout.writes[l])
            if rep.clt.W_skip is not None:
                g[below:] += rep.skip_backward(l, g[below:])
                terms = {t: _skip(rep, l, *tw) for t, tw in terms.items()}
        fresh = slice(start[l], start[l + 1])
        g[rows[fresh], pos[fresh]] = vectors[fresh]
        weights = torch.zeros(len(vectors[fresh]), P, 1, dtype=g.dtype, device=g.device)
        weights[rows[fresh] - start[l], pos[fresh]] = 1.0
        terms[l] = (vectors[fresh, None], weights)
        if l == L or (l == 0 and embed_images is not None):
            continue
        dense = start[l]  # the rows from here on pass densely; below, a group at a time as terms
        for t in sorted(terms):
            t_rows = slice(start[t], start[t + 1])
            if backward_terms and dense == start[t] and rep.terms_are_cheaper(terms[t][0].shape[1], P):
                through, images, mixed = rep.attention_backward_terms(l, *terms[t])
                g[t_rows] += through
                terms[t] = (torch.cat([terms[t][0], images], 1), torch.cat([terms[t][1], mixed], 2))
                dense = start[t + 1]
            else:
                del terms[t]
        if dense < R:
            sees = seen[dense:].flatten()
            at = sees.nonzero()[:, 0] if sees.float().mean() < 0.8 else None
            g[dense:] += rep.attention_backward(l, g[dense:], at)
    tokens = (g * rep.embed).sum(-1) if embed_images is None else g.view(R, P * d) @ embed_images.T
    return edges.view(R, P * layout.C).index_select(1, layout.gather), tokens


def _skip(rep: Replacement, layer: int, terms: torch.Tensor, weights: torch.Tensor):
    """Terms and weights of a gradient plus what it sends through the skip path of `layer`."""
    images, factor = rep.skip_backward_terms(layer, terms)
    if factor is None:
        return terms + images, weights
    return torch.cat([terms, images], 1), torch.cat([weights, weights * factor[:, None]], 2)
