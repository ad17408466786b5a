"""Every row of a small graph in one walk down the layers: the feature and logit targets together,
with few, large operations (their number grows with the layers, not with the positions).

The rows R = [features (by layer, position), logits] walk in runs: the rows at positions in one span
of `span` positions, so that a run below P' carries gradients [rows, P', d] and wastes little on the
zeros after each row's own position. In a run the rows are ordered by the layer t where each one's
gradient starts (a feature's own layer, L for the logits), so that below layer l the rows still
walking are a suffix. Walking down from the top, at each layer l:
1. the gradient at mlp_out[l] of the rows with t > l meets the sources writing there: per source
   layer s <= l one product batched over positions with their writes (`SlotSources`), added into the
   run's edges in cell layout, which are read out in the graph's column order at the end;
2. the skip path of layer l (if any), then the rows of layer l start, each at its position;
3. the frozen attention of layer l sends the gradient of the rows with t >= l to resid_pre[l]: the
   rows whose gradient is still a short sum of terms (`_terms_backward`; rows that start at layer l
   are one term) a group at a time while that is cheaper, the others in one dense pass.
At resid_mid[0] the embedding edges are one product with the images of the tokens
(`Replacement.embedding_images`; without them the gradient passes layer 0 too and meets the
embeddings at resid_pre[0]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from circuits.attribution.replacement import Replacement


class SlotSources:
    """The sources in cell layout, by position: at position p, for each source layer s its features
    at p (in node order), then the error node of layer s at p. `writes[l][p]` = (a, b, W [d, b - a]):
    what the cells a:b of position p write to slot (transcoder output layer) l: the ones there that
    write to l and the few between them that do not (the errors of layers < l: zero columns). The
    cells below position P' are the first `starts[P']`."""

    def __init__(self, rep: Replacement):
        L, P = rep.n_layers, rep.n_pos
        self.L, self.P = L, P
        self.layer, self.pos = rep.features[:, 0], rep.features[:, 1]
        counts = torch.bincount(self.pos * L + self.layer, minlength=P * L).view(P, L)  # features per (p, s)
        sizes = (counts + 1).flatten()
        first = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # [P * L + 1] the first cell of each (p, s)
        self.starts = first[::L].tolist()  # [P + 1] the first cell of each position
        by_layer = counts.T.flatten()  # nodes are sorted by (layer, position)
        node = torch.arange(len(self.layer), device=counts.device)
        rank = node - (by_layer.cumsum(0) - by_layer)[self.layer * P + self.pos]  # [n] among those at its (s, p)
        self.feature_cell = first[self.pos * L + self.layer] + rank  # [n]
        self.error_cell = (first[:-1] + counts.flatten()).view(P, L).T.flatten()  # [L * P] as the error nodes
        first = first[:-1].view(P, L)
        W = self._slot_writes(rep)  # [n_cells, L, d]
        self.writes: list[list[tuple[int, int, torch.Tensor]]] = []
        for l in range(L):
            writing = [s for s in range(l + 1) if l - s < rep.writes[s].shape[1]]  # per-layer: s == l only
            a, b = first[:, writing[0]].tolist(), (first[:, l] + counts[:, l] + 1).tolist()
            to_l = W[:, l].T  # [d, n_cells]
            self.writes.append([(a[p], b[p], to_l[:, a[p] : b[p]]) for p in range(P)])

    def _slot_writes(self, rep: Replacement) -> torch.Tensor:
        """What each cell writes to each slot [n_cells, L, d]: a feature of layer s to the slots s to
        s + T_s - 1 (`Replacement.writes`), the error of layer s to slot s, and zero to the later ones
        (within the cells a slot reads, those of the errors of earlier layers); the other entries are
        never read and not set."""
        L, P = self.L, self.P
        W = rep.embed.new_empty(self.starts[-1], L, rep.embed.shape[-1])
        start = torch.tensor([0] + [len(w) for w in rep.writes]).cumsum(0).tolist()
        for s, w in enumerate(rep.writes):
            W[:, s : s + w.shape[1]].index_copy_(0, self.feature_cell[start[s] : start[s + 1]], w)
        W.index_fill_(0, self.error_cell, 0)
        W[self.error_cell.view(L, P), torch.arange(L, device=W.device)[:, None]] = rep.errors
        return W

    def columns(self, Pp: int, width: int) -> torch.Tensor:
        """The cell of each of the graph's columns in rows `width` wide (features, errors [L, P],
        tokens [P], then columns that are no source: the logits') in a run below position Pp, whose
        cells are those of the sources below Pp, then the tokens' [Pp], then one zero cell: the cell
        of the sources at positions >= Pp and of the columns after the sources."""
        L, P, below = self.L, self.P, self.starts[Pp]
        positions = torch.arange(P, device=self.pos.device)
        cell = torch.cat([self.feature_cell, self.error_cell, below + positions])
        seen = torch.cat([self.pos, positions.repeat(L), positions]) < Pp
        return torch.cat([torch.where(seen, cell, below + Pp), cell.new_full((width - len(cell),), below + Pp)])


def every_row(
    rep: Replacement,
    logit_vectors: torch.Tensor,
    out: list[torch.Tensor],
    embed_images: torch.Tensor | None,
    backward_terms: bool = True,
    work_floats: int = 2**22,
    span: int = 8,
) -> None:
    """The rows of every feature and logit target: `logit_vectors` [T, d] the logits' gradients at
    the final residual stream (last position); written into out[0] [n, N] (the features') and out[1]
    [T, N] (the logits'), in the graph's column order (features, errors, tokens, then N - n_sources
    columns that are no source, written zero; whole rows of a row-major matrix are written straight
    from the walk's cells, with no copy between; out must start zeroed: with embedding images, the rows
    of layer 0 get their token columns alone). A run holds the rows at positions [a, a + span), in
    pieces whose gradients hold about `work_floats` numbers."""
    L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
    n, T, device = len(rep.features), len(logit_vectors), logit_vectors.device
    vectors = torch.cat([feature_vectors(rep), logit_vectors])  # [R, d]
    layers = torch.cat([rep.features[:, 0], torch.full((T,), L, device=device)])
    pos = torch.cat([rep.features[:, 1], torch.full((T,), P - 1, device=device)])
    sources = SlotSources(rep)
    tokens_only = rep.layer_counts()[0] if embed_images is not None else 0  # the nodes whose edges are tokens' only
    for a in range(0, P, span):
        Pp = min(a + span, P)
        rows = ((pos >= a) & (pos < Pp)).nonzero()[:, 0]  # in (layer, position) order
        columns = sources.columns(Pp, out[0].shape[1])
        tokens = (n + L * P, sources.starts[Pp], Pp)  # their first column, their first cell, how many
        for piece in rows.split(max(1, work_floats // (Pp * d))):
            cells = _walk(rep, sources, vectors[piece], layers[piece], pos[piece], Pp, embed_images, backward_terms)
            _write(out, (n, tokens_only), piece, cells, (columns, tokens))


def _write(
    out: list[torch.Tensor],
    nodes: tuple[int, int],
    rows: torch.Tensor,
    cells: torch.Tensor,
    layout: tuple[torch.Tensor, tuple[int, int, int]],
) -> None:
    """Gather the edges of rows [k] (ascending; < n: features, out[0], then logits, out[1]) from
    their cells [k, n_cells] into place, a run of consecutive rows at a time (into contiguous rows:
    gathering into a strided view is 6x slower). nodes = (n, m): rows < m hold token edges alone, and
    only those are copied (their other entries in out stay zero). layout = (columns, tokens): the
    cell of each column (`SlotSources.columns`), and the tokens' first column, first cell and count."""
    (n, m), (columns, (column, cell, Pp)) = nodes, layout
    breaks = ((rows.diff() != 1) | (rows[1:] == n) | (rows[1:] == m)).nonzero()[:, 0] + 1
    bounds = [0] + breaks.tolist() + [len(rows)]
    for i, j in zip(bounds[:-1], bounds[1:], strict=True):
        node = int(rows[i])
        dest, first = (out[0], node) if node < n else (out[1], node - n)
        if node < m:
            dest[first : first + j - i, column : column + Pp] = cells[i:j, cell : cell + Pp]
        else:
            torch.index_select(cells[i:j], 1, columns, out=dest[first : first + j - i])


def feature_vectors(rep: Replacement) -> torch.Tensor:
    """Each active feature's encoder row as a gradient at resid_mid of its layer [n, d] (folded
    through the frozen input norm where the transcoder reads after it)."""
    counts = rep.layer_counts()
    pos, feature = rep.features[:, 1].split(counts), rep.features[:, 2].split(counts)
    W_enc = rep.clt.W_enc.detach()  # a layer's rows at a time: 3x faster than indexing [layer, feature]
    rows = [W_enc[l].index_select(0, f) for l, f in enumerate(feature)]
    return torch.cat([rep.encoder_vectors(l, p, W) for l, (p, W) in enumerate(zip(pos, rows, strict=True))])


def _walk(
    rep: Replacement,
    sources: SlotSources,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    pos: torch.Tensor,
    Pp: int,
    embed_images: torch.Tensor | None,
    backward_terms: bool,
) -> torch.Tensor:
    """The edges into R targets: `vectors` [R, d] each one's gradient where it starts, at `pos` [R]
    (< Pp) of resid_mid of `layers` [R] (L: the final residual stream), rows ordered by layer.
    Returns the edges in cell layout [R, n_cells] (`SlotSources.columns`)."""
    L, d = rep.n_layers, vectors.shape[-1]
    R, rows = len(vectors), torch.arange(len(vectors), device=vectors.device)
    start = torch.searchsorted(layers, torch.arange(L + 2, device=layers.device)).tolist()  # t: start[t]:start[t + 1]
    below = sources.starts[Pp]  # the cells of the sources below Pp; then the tokens, a zero cell
    cells = vectors.new_empty(R, below + Pp + 1)  # the edges in cell layout (of layer 0 with images: tokens only)
    cells[start[1] if embed_images is not None else 0 :].zero_()
    g = vectors.new_empty(R, Pp, d)  # the gradient at the residual stream, walking down; rows set as they start
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows of layer t -> their gradient as terms
    for l in range(L, -1, -1):
        if l < L and start[l + 1] < R:  # slot l: the rows with t > l meet the sources writing to mlp_out[l]
            above = g[start[l + 1] :]  # [R', P', d] (a view)
            at_out = above if rep.mlp_post is None else rep.mlp_post[l].backward(above)
            first = next(t for t in range(l + 1, L + 1) if start[t + 1] > start[t])  # the lowest layer among them
            # their first rows at or after each position: those before see none of it (the lowest layer's only)
            seeing = torch.searchsorted(pos[start[first] : start[first + 1]], torch.arange(Pp, device=pos.device))
            _contract(sources.writes[l][:Pp], at_out, cells[start[l + 1] :], seeing.tolist())
            if rep.clt.W_skip is not None:
                above += rep.skip_backward(l, above)
                terms = {t: _skip_terms(rep, l, *tw) for t, tw in terms.items()}
        fresh = slice(start[l], start[l + 1])
        passes = l < L and not (l == 0 and embed_images is not None)  # the rows here pass attention l
        overwrites = passes and backward_terms and rep.terms_are_cheaper(1, Pp)  # as terms, first of all
        if start[l + 1] > start[l] and (passes or l == L):  # (layer 0 with images: `_one_position_tokens`)
            weights = vectors.new_zeros(1, start[l + 1] - start[l], Pp)
            weights[0, rows[fresh] - start[l], pos[fresh]] = 1.0
            terms[l] = (vectors[None, fresh], weights)
            if not overwrites:
                g[fresh].zero_()
                g[rows[fresh], pos[fresh]] = vectors[fresh]
        if passes:
            _attention(rep, l, g, terms, start, backward_terms, overwrites)
            if overwrites:  # their first gradient, besides what attention l sends back
                g[rows[fresh], pos[fresh]] += vectors[fresh]
    tokens = cells[:, below : below + Pp]  # zeros
    if embed_images is None:
        tokens.copy_(torch.linalg.vecdot(g, rep.embed[:Pp]))
    else:  # the images of the tokens k < Pp at resid_mid[0] of the positions q < Pp
        _one_position_tokens(vectors[: start[1]], pos[: start[1]], embed_images, tokens[: start[1]])
        tokens[start[1] :].addmm_(g[start[1] :].view(R - start[1], Pp * d), embed_images[:Pp, : Pp * d].T)
    return cells


def _one_position_tokens(vectors: torch.Tensor, pos: torch.Tensor, images: torch.Tensor, out: torch.Tensor) -> None:
    """The embedding edges out [n, P'] of the rows of layer 0, whose gradient at resid_mid[0] is their
    vector [n, d] at their position pos [n] (ascending) alone: one product per position with the
    tokens' images there (`Replacement.embedding_images` [P, P * d]), not one over every position of a
    gradient that is zero but at one."""
    Pp, d = out.shape[1], vectors.shape[1]
    at_query = images[:Pp].view(Pp, -1, d)  # [P'(key), P(query), d]
    bounds = torch.searchsorted(pos, torch.arange(Pp + 1, device=pos.device)).tolist()
    for q, (i, j) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if j > i:
            torch.mm(vectors[i:j], at_query[:, q].T, out=out[i:j])


def _contract(
    writes: list[tuple[int, int, torch.Tensor]], g: torch.Tensor, cells: torch.Tensor, seeing: list[int]
) -> None:
    """Add the edges from the sources writing to one slot into the cells [R', n_cells] of rows whose
    gradient there is g [R', P', d]: one product per position p, g[r:, p] @ W_p, added in place
    (`SlotSources.writes`), from the row r = seeing[p] on (the rows before, at positions < p, have a
    zero gradient there: their cells stay zero)."""
    for p, ((a, b, W), r) in enumerate(zip(writes, seeing, strict=True)):
        cells[r:, a:b].addmm_(g[r:, p], W)


def _attention(
    rep: Replacement,
    l: int,
    g: torch.Tensor,
    terms: dict[int, tuple[torch.Tensor, torch.Tensor]],
    start: list[int],
    backward_terms: bool,
    overwrites: bool,
) -> None:
    """Add to g [R, P', d] (the gradient at resid_mid[l] of the rows from start[l] on) what passes back
    through the frozen attention of layer l: as terms for the groups in `terms` (rows of layer t,
    lowest t first) while that is cheaper than the dense pass, updating or dropping their terms;
    densely for the rest. `overwrites`: the rows of layer l (as terms) are written, not added to."""
    Pp, dense = g.shape[1], start[l]  # the rows from `dense` on pass densely
    for t in sorted(terms):
        rows, J = slice(start[t], start[t + 1]), len(terms[t][0])
        if backward_terms and dense == start[t] and rep.terms_are_cheaper(J, Pp):
            images, mixed = _terms_backward(rep, l, *terms[t])
            if overwrites and t == l:
                torch.bmm(mixed.permute(1, 2, 0), images.transpose(0, 1), out=g[rows])
            else:
                g[rows].baddbmm_(mixed.permute(1, 2, 0), images.transpose(0, 1))
            dense = start[t + 1]
            if rep.terms_are_cheaper(J + len(images), Pp):
                terms[t] = (torch.cat([terms[t][0], images]), torch.cat([terms[t][1], mixed]))
                continue
        del terms[t]
    if dense < len(g):
        _dense_backward(rep, l, g[dense:])


def _dense_backward(rep: Replacement, l: int, g: torch.Tensor) -> None:
    """Add to g [R', P', d] (the last rows of a larger gradient) what passes back through the frozen
    attention of layer l: the projection onto every head as one product, the mixing over positions
    per head at d_head (H times fewer multiply-adds than at d), the value projection summing the
    heads, added in place (45 against 22 ms at 32 positions and 600 rows on one thread)."""
    R, Pp, d = g.shape
    H, dh = rep.W_O.shape[1], rep.W_O.shape[2]
    u = (g.view(R * Pp, d) @ rep.back_O[l]).view(R, Pp, H, dh)
    u = u.permute(2, 1, 0, 3).reshape(H, Pp, R * dh)  # [H, P'(query), R' * d_head]
    mixed = torch.bmm(rep.back_mix[l, :, :Pp, :Pp], u)  # [H, P'(key), R' * d_head]
    mixed = mixed.view(H, Pp, R, dh).permute(2, 1, 0, 3).reshape(R * Pp, H * dh)
    g.view(R * Pp, d).addmm_(mixed, rep.back_V[l])


def _terms_backward(
    rep: Replacement, l: int, terms: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention backward of layer l for gradients kept as short sums g[i, p] = sum_j
    weights[j, i, p] * terms[j, i] (terms [J, n, d], weights [J, n, P']): the projections act on the
    J terms, the mixing over positions on their weights. Returns what passes back as the same kind of
    sum, each term through each head: terms [H * J, n, d] and weights [H * J, n, P']."""
    J, n, d = terms.shape
    H, dh, Pp = rep.W_O.shape[1], rep.W_O.shape[2], weights.shape[-1]
    u = (terms.view(J * n, d) @ rep.back_O[l]).view(J * n, H, dh).transpose(0, 1)  # [H, J * n, d_head]
    images = torch.bmm(u, rep.back_V[l].view(H, dh, d))  # [H, J * n, d]
    mix = rep.back_mix[l, :, :Pp, :Pp].transpose(1, 2)  # [H, P'(query), P'(key)]
    mixed = torch.bmm(weights.view(1, J * n, Pp).expand(H, J * n, Pp), mix)  # [H, J * n, P'(key)]
    return images.view(H * J, n, d), mixed.view(H * J, n, Pp)


def _skip_terms(
    rep: Replacement, l: int, terms: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients kept as terms [J, n, d] with weights [J, n, P'] (`_terms_backward`), plus what they
    send through the skip path of layer l (`Replacement.skip_backward_terms`): each term's image added
    to it, or, where frozen norms scale it by position, appended as J more terms, rescaled weights."""
    images, factor = rep.skip_backward_terms(l, terms)
    if factor is None:
        return terms + images, weights
    return torch.cat([terms, images]), torch.cat([weights, weights * factor[: weights.shape[-1]]])
