"""Attribution graphs: the direct effect of every source node on every target node of the frozen
replacement model (see `replacement.py`), by batched backward passes written out by hand.

Phases:
1. Freeze the prompt (`build_replacement`) and choose the logit targets.
2. Lay out the sources: active features (decoder rows times activation, one block per source layer
   and position), error nodes, token embeddings (with their images at resid_mid of layer 0).
3. For a batch of targets of one layer (logit directions at the final residual stream, or encoder
   rows at `resid_mid` of their layer, folded through the frozen pre-MLP norm when the transcoder
   reads inside or after it), walk down the layers carrying the gradient [batch, pos, d_model]: pass
   back through the frozen attention and norms (and the transcoder's skip path), as a short sum of
   terms while that is cheaper, and record the gradient at every transcoder output below (through
   the frozen post-MLP norm for mlp.hook_out). Positions after a batch's last target are never
   touched.
4. Contract the recorded gradients with the sources: a few batched products per source layer over
   blocks of its features at one position (`LayerBlocks`; per position over every layer's features
   when they are few, see `AttributionConfig.merge_below`); the embeddings through their images at
   resid_mid[0].
The edge s -> t is a_s * d(input_t)/d(a_s): its value's share of the target's input, so every node's
input is exactly the sum of its incoming edges plus its bias (the constant terms).
"""

from __future__ import annotations

import copy
import logging
import math
import mmap
from dataclasses import fields, replace
from functools import cached_property
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.attribution.config import (
    DECODER_ROWS_AT_ONCE,
    EDGES_AT_ONCE,
    AttributionConfig,
    block_width,
    has_embedding_images,
    rows_per_pass,
    rows_per_renewal,
    sparse_graph,
    written_below_last,
)
from circuits.attribution.graph import Graph, compute_influence, edge_influence, normalize_matrix
from circuits.attribution.replacement import Replacement, build_replacement, layer_writes
from circuits.attribution.single_pass import every_row
from circuits.attribution.targets import LogitTarget, resolve_targets
from circuits.errors import CircuitsError
from circuits.heap import pin_heap_thresholds, release_heap
from circuits.models import prompt_tokens, token_strings
from circuits.processing import transcoder_processing, weight_processing
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits

log = logging.getLogger(__name__)


class Sources:
    """The source nodes of a replacement, laid out for the contraction: features in their sorted
    order (one block per source layer and position), then errors [L, P], then tokens [P]."""

    def __init__(self, rep: Replacement, cfg: AttributionConfig):
        L, P, d = rep.n_layers, rep.n_pos, rep.embed.shape[-1]
        self.rep, self.L, self.P = rep, L, P
        self.backward_terms, self.work_floats = cfg.backward_terms, cfg.work_floats
        self.n_features = len(rep.features)
        self.n = self.n_features + L * P + P
        self.errors = rep.errors.transpose(0, 1).contiguous()  # [P, L, d]: laid out like the gradients
        # the embedding edges from the gradient at resid_mid[0], when the images fit (P^2 d floats)
        self.embed_images = rep.embedding_images() if has_embedding_images(cfg, P, d) else None
        thick = self.n_features >= cfg.merge_below * L * P  # features per (layer, position) on average
        # merged per position only while its zero-padded copy of the writes ([n, L, d]) stays small
        self.merged = not thick and self.n_features * L * d <= cfg.dense_floats

    @cached_property
    def by_layer(self) -> list[LayerBlocks]:
        return [] if self.merged else self._by_layer(self.rep)

    @cached_property
    def by_position(self) -> list[tuple[torch.Tensor, list[int], list[tuple[int, int, int]]]]:
        return self._by_position(self.rep) if self.merged else []

    def _by_layer(self, rep: Replacement) -> list[LayerBlocks]:
        """[s] -> the features of source layer s cut into blocks of one position (`LayerBlocks`). The
        replacement's writes are dropped a layer at a time, each before its blocks are made again
        from the decoder (1 GB on 4,096 tokens): they are never held twice."""
        layer, pos, feature = rep.features.T
        bounds = torch.searchsorted(layer, torch.arange(self.L + 1, device=layer.device)).tolist()  # sorted by layer
        out, cross = [], rep.clt.cfg.cross_layer
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            rep.writes.pop(0)
            below = written_below_last(self.L, s, cross)
            out.append(LayerBlocks.of(rep.clt.W_dec[s], feature[a:b], rep.activations[a:b], pos[a:b], a, self.P, below))
        return out

    def _by_position(self, rep: Replacement) -> list[tuple[torch.Tensor, list[int], list[tuple[int, int, int]]]]:
        """[p] -> (writes [n_p, L * d], below [L + 1], runs): the features at position p of every
        layer in node order, their writes (zero below a feature's own layer), how many sit below each
        layer, and per layer with features there (first node, first row, row stop): each layer's
        features at p are one run of nodes. One contraction product per position."""
        L, d = self.L, rep.embed.shape[-1]
        layer, pos = rep.features[:, 0], rep.features[:, 1]
        order = torch.argsort(pos * L + layer, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        slots = rep.embed.new_zeros(self.n_features, L, d)  # in position order: filled once, never copied
        start = 0
        for s, writes in enumerate(rep.writes):
            slots[rank[start : start + len(writes)], s : s + writes.shape[1]] = writes
            start += len(writes)
        slots = slots.flatten(1)
        bounds = torch.searchsorted(pos[order], torch.arange(self.P + 1, device=pos.device)).tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            below = torch.searchsorted(layer[order[a:b]], torch.arange(L + 1, device=pos.device)).tolist()
            nodes = order[a:b].tolist()
            runs = [(nodes[below[s]], below[s], below[s + 1]) for s in range(L) if below[s + 1] > below[s]]
            out.append((slots[a:b], below, runs))
        return out

    def drop_last_layer_writes(self) -> None:
        """Drop from the blocks what the features write to the last layer, once the logit rows are
        computed: no other row reads it (a quarter of the blocks with 4 layers, a third of their
        writes with 2). Nothing is copied; `rows` into the logits fails from here on."""
        for s, blocks in enumerate(self.by_layer):
            self.by_layer[s] = blocks._replace(last=None)

    def rows(self, layer: int, pos: torch.Tensor, vec: torch.Tensor, out: torch.Tensor | None = None):
        """Edges from every source into a batch of targets of one layer: `vec` [B, d] injected at
        resid_mid of `layer` (layer L: the final residual stream) at positions `pos` [B], ascending
        -> [B, n_sources] (written into `out` when given, which must start zeroed)."""
        g_post, g = self._walk_down(layer, pos, vec)
        out = vec.new_zeros(len(pos), self.n) if out is None else out
        self._contract(layer, pos, g_post, g, out)
        return out

    def _walk_down(self, t: int, pos: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets' gradients at each MLP output below them, g_post [B, P', t, d], and at
        resid_mid[0] (at resid_pre[0] without embedding images), [B, P', d]; P' = pos[-1] + 1."""
        rep, L = self.rep, self.L
        B, Pp, d = len(pos), int(pos[-1]) + 1, vec.shape[-1]
        batch = torch.arange(B, device=vec.device)
        g = vec.new_zeros(B, Pp, d)  # gradient at the residual stream, walking down
        g[batch, pos] = vec
        g_post = vec.new_empty(B, Pp, t, d)
        # g as a short sum of terms [B, J, d] with weights over positions [B, P', J] while that is
        # cheaper than dense: vec at pos, then J grows (H + 1)-fold per attention layer; None once dense
        terms, weights = vec[:, None], vec.new_zeros(B, Pp, 1)
        weights[batch, pos] = 1.0
        if not self.backward_terms:
            terms, weights = None, None
        seen = torch.arange(Pp, device=vec.device) <= pos[:, None]  # [B, P']: the positions each target sees
        rows = seen.flatten().nonzero()[:, 0] if seen.float().mean() < 0.8 else None
        for l in range(min(t, L - 1), -1, -1):
            if l < t:  # g is the gradient at mlp_out[l] = resid_pre[l + 1], and at the transcoder's output
                g_post[:, :, l] = g if rep.mlp_post is None else rep.mlp_post[l].backward(g)
                if rep.clt.W_skip is not None:  # and at resid_mid[l]
                    g = g + rep.skip_backward(l, g)
                    terms, weights = rep.skip_terms(l, terms, weights)
            if l == 0 and self.embed_images is not None:
                break
            if terms is not None and rep.terms_are_cheaper(terms.shape[1], Pp):
                through, images, mixed = rep.attention_backward_terms(l, terms, weights)
                g = g + through
                J = terms.shape[1] + images.shape[1]
                terms, weights = (
                    (torch.cat([terms, images], 1), torch.cat([weights, mixed], 2))
                    if rep.terms_are_cheaper(J, Pp)
                    else (None, None)
                )
            else:
                g = g + rep.attention_backward(l, g, rows)
                terms = None
        return g_post, g

    def _contract(self, t: int, pos: torch.Tensor, g_post: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
        """Write the edges from the gradients of `_walk_down` into out [B, n_sources]: per source layer
        over its blocks (`LayerBlocks.contract`), or one product per position over the targets that see
        it (see `AttributionConfig.merge_below`); the errors; and the embeddings (through their images
        at resid_mid[0], or directly at resid_pre[0])."""
        B, Pp, d = g.shape
        L, P = self.L, self.P
        first = torch.searchsorted(pos, torch.arange(Pp, device=pos.device)).tolist()  # targets from first[p] on see p
        cross = self.rep.clt.cfg.cross_layer
        for s, blocks in enumerate(self.by_layer[:t]):
            blocks.contract(g_post[:, :, s : t if cross else s + 1], self.work_floats, out)
        for p, (writes, below, runs) in enumerate(self.by_position[:Pp]):
            f, n = first[p], below[t]  # the features at p below layer t: the first n
            if n and f < B:
                edges = g_post[f:, p].flatten(1) @ writes[:n, : t * d].T  # [B - f, n]
                for node, i, j in runs:  # copies of contiguous columns (index_copy_ is 3x slower)
                    if j <= n:
                        out[f:, node : node + j - i] = edges[:, i:j]
        e0, e1 = self.n_features, self.n_features + L * P
        errors = out[:, e0:e1].view(B, L, P)
        for l in range(t):  # one layer at a time: a temporary of g's size, not g_post's
            errors[:, l, :Pp] = torch.linalg.vecdot(g_post[:, :, l], self.errors[:Pp, l])
        tokens = out[:, e1 : e1 + Pp]
        if self.embed_images is None:
            tokens.copy_((g * self.rep.embed[:Pp]).sum(-1))
        else:
            torch.matmul(g.view(B, Pp * d), self.embed_images[:Pp, : Pp * d].T, out=tokens)


class LayerBlocks(NamedTuple):
    """The features of one source layer cut into blocks of at most `width` features of one position,
    their writes zero-padded, so that the contraction of a batch's gradients with all of them is a
    few batched products (one product per (layer, position) costs more in calls than in arithmetic
    on long prompts)."""

    start: int  # the layer's first feature node
    positions: torch.Tensor  # [n_s] each feature's position, ascending
    block_pos: torch.Tensor  # [n_blocks] each block's position, ascending
    writes: torch.Tensor  # [n_blocks, width, below * d] the features' writes below the last layer, zero rows as padding
    last: torch.Tensor | None  # [n_blocks, width, (T_s - below) * d] and to the last layer (None once dropped)
    slot: torch.Tensor  # [n_s] each feature's row in writes.view(n_blocks * width, -1)

    @classmethod
    def of(
        cls,
        W_dec: torch.Tensor,
        features: torch.Tensor,
        acts: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        P: int,
        below: int,
        chunk: int = DECODER_ROWS_AT_ONCE,
    ) -> LayerBlocks:
        """Blocks of the features [n_s] of one source layer, with activations acts [n_s] at positions
        [n_s] (ascending), nodes from `start` on, `block_width` wide: their writes, decoder rows W_dec
        [F, T_s, d] times activation (`replacement.layer_writes`), made `chunk` features at a time
        (the blocks are the only full copy); those to the `below` layers under the last one apart from
        those to the last one, which only the logit rows read (dropped after them without a copy)."""
        counts = torch.bincount(positions, minlength=P)  # [P]
        width, _ = block_width(counts)
        rank = torch.arange(len(positions), device=positions.device) - (counts.cumsum(0) - counts)[positions]
        per_position = (counts + width - 1) // width  # [P] blocks per position
        block = (per_position.cumsum(0) - per_position)[positions] + rank // width
        n_blocks = int(per_position.sum())
        slot = block * width + rank % width
        d = W_dec.shape[2]
        padded = W_dec.new_zeros(n_blocks * width, below * d)
        last = W_dec.new_zeros(n_blocks * width, (W_dec.shape[1] - below) * d)
        for c in range(0, len(features), chunk):
            writes = layer_writes(W_dec, features[c : c + chunk], acts[c : c + chunk]).flatten(1)
            padded[slot[c : c + chunk]], last[slot[c : c + chunk]] = writes[:, : below * d], writes[:, below * d :]
        block_pos = torch.repeat_interleave(torch.arange(P, device=positions.device), per_position)
        return cls(start, positions, block_pos, padded.view(n_blocks, width, -1), last.view(n_blocks, width, -1), slot)

    def contract(self, g: torch.Tensor, work_floats: int, out: torch.Tensor) -> None:
        """The edges from these features into a batch of targets, from the targets' gradients g
        [B, P', T, d] at the T layers they write to below the targets: into out[:, their nodes]. Rows
        of targets before a feature's position get its exact zero (g is zero after a target); the
        logit rows' T reaches the last layer (`last`)."""
        B, Pp, T, d = g.shape
        n = int(torch.searchsorted(self.positions, Pp))  # the features the batch sees
        n_blocks = int(torch.searchsorted(self.block_pos, Pp))
        width, below = self.writes.shape[1], self.writes.shape[2] // d
        edges = g.new_empty(n_blocks, width, B)
        by_position = g.transpose(0, 1)  # [P', B, T, d]
        step = max(1, work_floats // (B * T * d))  # blocks per product: their gradients gathered
        for a in range(0, n_blocks, step):
            b = min(a + step, n_blocks)
            gathered = by_position[self.block_pos[a:b]].flatten(2).transpose(1, 2)  # [k, T * d, B]
            torch.bmm(self.writes[a:b, :, : T * d], gathered[:, : below * d], out=edges[a:b])
            if T > below:
                edges[a:b].baddbmm_(self.last[a:b], gathered[:, below * d :])
        out[:, self.start : self.start + n] = edges.view(n_blocks * width, B)[self.slot[:n]].T


def untouched_zeros(
    *shape: int, dtype: torch.dtype, device: str | torch.device = "cpu", huge_pages: bool = False
) -> torch.Tensor:
    """A zero tensor; on the CPU one in fresh anonymous memory that the OS maps on first write, a
    small page at a time: no time is spent filling it, and entries never written (sources after a
    target's position, rows never computed) take no memory. torch.zeros would write every page (0.1 s
    and all of N^2 floats for a 5,600-node graph); numpy's zeros asks for huge pages, so that each
    scattered row written takes 2 MB. `huge_pages`: for a tensor written nearly whole, ask for 2 MB
    pages (private memory: shared anonymous memory gets none), one fault where 512 small ones would
    cost 2-5 us each (7,500 faults and 25 ms against 250 and 12 ms for a 2,850-node graph's rows on
    this 2-core VM)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = max(1, math.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if huge_pages:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_HUGEPAGE)
    else:
        memory = mmap.mmap(-1, size)
    return torch.frombuffer(memory, dtype=dtype)[: math.prod(shape)].view(shape)


def logit_vectors(rep: Replacement, W_U: torch.Tensor, targets: list[LogitTarget]) -> torch.Tensor:
    """Each target's gradient at the final residual stream of the last position: [n_targets, d]."""
    directions = torch.stack([t.weights for t in targets]) @ W_U.T  # [T, d]
    return rep.ln_final.backward_at(directions, torch.full((len(targets),), rep.n_pos - 1, device=W_U.device))


def node_inputs_and_bias(rep: Replacement, W_U: torch.Tensor, b_U: torch.Tensor, targets: list[LogitTarget]):
    """Inputs of the target nodes (feature pre-activations, then target logits) and their constant
    terms (from the linear model with every source zeroed): ([n + T], [n + T])."""
    layer, pos, feature = rep.features.T
    W_enc, b_enc = rep.clt.W_enc.detach(), rep.clt.b_enc.detach()
    (L, F, d), P = W_enc.shape, rep.n_pos
    weights = torch.stack([t.weights for t in targets])  # [T, V]
    mid0, final0 = rep.linear_forward(with_sources=False)
    in0 = mid0 if rep.mlp_in is None else torch.stack([rep.clt_input(l, mid0[l]) for l in range(L)])
    W_enc, in0, b_enc = (
        W_enc.reshape(L * F, d),
        in0.reshape(L * P, d),
        b_enc.reshape(L * F),
    )  # in0: the inputs' constants
    rows, cells = layer * F + feature, layer * P + pos  # each feature's encoder row, and its input's (layer, position)
    feat_bias = torch.cat(
        [  # by 8,192 features: the gathered rows stay small on long prompts
            torch.linalg.vecdot(W_enc.index_select(0, r), in0.index_select(0, c)) + b_enc.index_select(0, r)
            for r, c in zip(rows.split(8192), cells.split(8192), strict=True)
        ]
    )
    final = rep.ln_final.forward_at(final0[-1:], torch.tensor([P - 1], device=W_U.device))  # [1, d] the last position
    logit_bias = weights @ (final[0] @ W_U + b_U)
    return torch.cat([rep.pre_activations, weights @ rep.logits]), torch.cat([feat_bias, logit_bias])


@torch.no_grad()
def attribute(
    prompt: str,
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    config: AttributionConfig | None = None,
    *,
    progress: bool = True,
    **overrides,
) -> Graph:
    """The unpruned attribution graph of `prompt`'s next-token prediction (see `Graph` for the layout).
    `config` (default `AttributionConfig()`) with any of its fields replaced by `overrides`, e.g.
    `attribute(prompt, model, clt, batch_size=64, targets=["Austin"])`."""
    cfg = replace(config or AttributionConfig(), **overrides)
    cfg.targets = list(cfg.targets or [])
    for name in ("batch_size", "max_feature_nodes"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise CircuitsError(f"{name} is {value}: pass a positive number, or none for the default")
    check_fits(transcoder.cfg, model)
    pin_heap_thresholds()
    device, dtype = cfg.device, cfg.dtype
    torch_dtype = getattr(torch, dtype)
    if model.W_U.device != torch.device(device):
        model, transcoder = model.to(device, print_details=False), transcoder.to(device)
    tokens = prompt_tokens(model, prompt)[0]  # [pos]
    # no version counters or view records: a short prompt is thousands of small operations (4 to 10%
    # of its time); the graph is assembled after, so that every tensor it holds is a normal one
    with torch.inference_mode():
        rep = build_replacement(model, transcoder, tokens, torch_dtype)
        W_U, b_U = model.W_U.detach().to(torch_dtype), model.b_U.detach().to(torch_dtype)
        cap = model.cfg.output_logits_soft_cap  # the targets are the logits before it, their probabilities after
        logits = rep.logits if cap <= 0 else cap * torch.tanh(rep.logits / cap)
        logit_targets = resolve_targets(model, logits, cfg.targets, cfg.target_probability, cfg.max_targets)
        sources = Sources(rep, cfg)
        n, L = sources.n_features, rep.n_layers
        log.info("%d tokens, %d active features, %d targets", rep.n_pos, n, len(logit_targets))
        vectors = logit_vectors(rep, W_U, logit_targets)  # [T, d]
        store, logit_rows, selected = _rows(rep, sources, vectors, logit_targets, cfg, progress)
        inputs, bias = node_inputs_and_bias(rep, W_U, b_U, logit_targets)
        inhibited = []
        if cfg.inhibited:
            inhibited = inhibited_features(sources, selected, cfg.inhibited, batch_size(sources, cfg, L))
    adjacency = store.graph_adjacency(selected, logit_rows)
    return Graph(
        prompt=prompt,
        tokens=tokens.cpu(),
        token_strs=token_strings(model.tokenizer, tokens.tolist()),
        features=rep.features[selected].cpu(),
        activations=rep.activations[selected].cpu(),
        adjacency=adjacency.cpu(),
        target_tokens=torch.tensor([t.token for t in logit_targets]),
        target_names=[t.name for t in logit_targets],
        target_probs=torch.tensor([t.prob for t in logit_targets]),
        inputs=torch.cat([inputs[selected], inputs[n:]]).cpu(),
        bias=torch.cat([bias[selected], bias[n:]]).cpu(),
        n_layers=L,
        config={
            "attribution": {f.name: copy.copy(getattr(cfg, f.name)) for f in fields(cfg)},  # asdict: 0.1 ms
            "model": model.cfg.model_name,
            "n_active_features": n,
            "model_processing": weight_processing(model),
            "transcoder": _transcoder_record(transcoder.cfg),
        },  # fmt: skip
        inhibited=inhibited,
    )


def _rows(
    rep: Replacement,
    sources: Sources,
    vectors: torch.Tensor,
    logit_targets: list[LogitTarget],
    cfg: AttributionConfig,
    progress: bool,
) -> tuple[DenseRows | SparseRows, torch.Tensor, torch.Tensor]:
    """The graph's rows (the store holding them, the logit rows [T, sources], the selected features):
    a small dense graph with every feature kept in one walk, the others by batches of rows."""
    n, L, P, device = sources.n_features, rep.n_layers, rep.n_pos, vectors.device
    T, N = len(logit_targets), sources.n + len(logit_targets)
    cap = n if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n)
    if cap < n:
        log.info("keeping the %d most influential of %d active features (max_feature_nodes)", cap, n)
    last = torch.full((T,), P - 1, device=device)
    sparse = sparse_graph(cap, T, sources.n, cfg)
    one_pass = not sparse and cap == n and cfg.batch_size is None
    if sparse:
        log.info("sparse graph: each feature row keeps its %d largest edges (edges_per_row)", cfg.edges_per_row)
        store: DenseRows | SparseRows = SparseRows(sources, cfg.edges_per_row, cap)
        logit_rows = sources.rows(L, last, vectors)  # [T, sources]
    else:
        with torch.inference_mode(False):  # a normal tensor, the graph's own, written in place below
            # in huge pages for one pass, which writes every row
            adjacency = untouched_zeros(N, N, dtype=vectors.dtype, device=device, huge_pages=one_pass)
        store = DenseRows(adjacency, sources, cap)
        logit_rows = store.adjacency[sources.n :, : sources.n]
        if not one_pass:
            sources.rows(L, last, vectors, out=logit_rows)
    if one_pass:  # every row in one walk (fewer, larger operations)
        rows = [store.adjacency[:n], store.adjacency[sources.n :]]  # whole rows: contiguous
        every_row(rep, vectors, rows, sources.embed_images, cfg.backward_terms, cfg.work_floats, cfg.single_pass_span)
        return store, logit_rows, torch.arange(n, device=device)
    sources.drop_last_layer_writes()  # the logit rows are done
    selected = _feature_rows(sources, store, logit_rows, logit_targets, cap, cfg, progress)
    if not cfg.inhibited:  # no more rows: the blocks go before the graph is assembled
        del sources.by_layer  # (laid out again they would fail: the writes are gone)
    return store, logit_rows, selected


def _transcoder_record(cfg: CLTConfig) -> dict:
    """What a graph records of its transcoder: where it reads and writes, and the weight processing
    of the model it was trained on."""
    return {
        "input_hook": cfg.input_hook, "output_hook": cfg.output_hook, "model_processing": transcoder_processing(cfg),
        "cross_layer": cfg.cross_layer, "skip": cfg.skip, "n_features": cfg.n_features, "model_name": cfg.model_name,
    }  # fmt: skip


def inhibited_features(sources: Sources, selected: torch.Tensor, k: int, batch: int | None = None) -> list[dict]:
    """The k inactive features at the last position with the most negative pre-activation
    contribution from the selected feature nodes (inhibition the graph's edges cannot show, since
    an inactive feature is no node). Each record: layer, pos, feature, pre_activation, bias,
    inhibition (the selected features' summed contribution), contributions (from every source
    node, in the graph's column order, summing with bias to pre_activation) and the top inhibitors.
    `batch`: input components per backward pass (None: all d at once)."""
    rep, L, P = sources.rep, sources.L, sources.P
    d = rep.embed.shape[-1]
    mid0, _ = rep.linear_forward(with_sources=False)
    dev = rep.embed.device
    keep = torch.cat([selected, torch.arange(sources.n_features, sources.n, device=dev)])
    candidates = []
    for l in range(L):
        last = torch.full((d,), P - 1, device=dev)
        basis = rep.encoder_vectors(l, last, torch.eye(d, dtype=rep.embed.dtype, device=dev))  # each input component
        step = batch or d
        J = torch.cat([sources.rows(l, last[a : a + step], basis[a : a + step])[:, keep] for a in range(0, d, step)])
        # J [d, sources]: the transcoder's input at (l, P-1)
        W_enc, b_enc = rep.clt.W_enc[l].detach(), rep.clt.b_enc[l].detach()
        pre = rep.clt_in[l, P - 1] @ W_enc.T + b_enc  # [F]
        in0 = rep.clt_input(l, mid0[l])[P - 1]  # [d] the input's constant part
        from_features = W_enc @ J[:, : len(selected)].sum(1)  # [F]
        active = (rep.features[:, 0] == l) & (rep.features[:, 1] == P - 1)
        inactive = torch.ones_like(pre, dtype=torch.bool)
        inactive[rep.features[active, 2]] = False
        for f in torch.where(inactive, from_features, torch.inf).topk(k, largest=False).indices.tolist():
            contributions = W_enc[f] @ J  # [sources]
            top = contributions[: len(selected)].topk(min(5, len(selected)), largest=False)
            candidates.append({
                "layer": l, "pos": P - 1, "feature": f, "pre_activation": pre[f].item(),
                "bias": (W_enc[f] @ in0 + b_enc[f]).item(), "inhibition": from_features[f].item(),
                "contributions": contributions.tolist(),
                "inhibitors": [[i, w] for i, w in zip(top.indices.tolist(), top.values.tolist(), strict=True)],
            })  # fmt: skip
    return sorted(candidates, key=lambda c: c["inhibition"])[:k]


def batch_size(sources: Sources, cfg: AttributionConfig, layer: int) -> int:
    """`rows_per_pass` for this prompt."""
    return rows_per_pass(cfg, sources.P, sources.rep.embed.shape[-1], layer)


class DenseRows:
    """The feature rows written in place into the dense adjacency [N, N]; with a cap, their
    normalised feature columns in the order computed, for the influence estimate."""

    def __init__(self, adjacency: torch.Tensor, sources: Sources, cap: int):
        self.adjacency, self.sources = adjacency, sources
        self.rows = adjacency[: sources.n_features, : sources.n]
        capped = cap < sources.n_features
        self.normalized = adjacency.new_empty(cap, sources.n_features) if capped else None
        self.ids: list[torch.Tensor] = []

    def out(self, start: int, stop: int) -> torch.Tensor:
        return self.rows[start:stop]

    def add(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows [k, sources] of the features `ids` [k] (already in place when they are `out`'s)."""
        if rows.data_ptr() != self.rows[ids[0]].data_ptr():
            self.rows[ids] = rows
        if self.normalized is not None:
            k = sum(len(i) for i in self.ids)
            self.normalized[k : k + len(ids)] = normalize_matrix(rows)[:, : self.sources.n_features]
        self.ids.append(ids)

    def influence(self, direct: torch.Tensor) -> torch.Tensor:
        """`_feature_influence` through the rows added so far."""
        done = torch.cat(self.ids) if self.ids else direct.new_empty(0, dtype=torch.long)
        return _feature_influence(direct, self.normalized[: len(done)], done)

    def graph_adjacency(self, selected: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        """The adjacency of the graph [N', N'] over the selected features and every other node."""
        n, N = self.sources.n_features, len(self.adjacency)
        if len(selected) == n:
            return self.adjacency.cpu()
        keep = torch.cat([selected, torch.arange(n, N, device=selected.device)])
        out = self.adjacency.new_zeros(len(keep), len(keep))  # only the feature and logit rows hold edges
        out[: len(selected)] = self.adjacency[selected][:, keep]
        out[-len(logit_rows) :] = self.adjacency[-len(logit_rows) :][:, keep]
        return out.cpu()


class SparseRows:
    """The feature rows reduced as they come: each keeps its `keep` largest edges (exact values)
    and its total absolute input, so memory grows with the rows kept, not with N^2. The edges of
    at most `capacity` rows go into buffers reserved once, so that each renewal of the influence
    estimate reads them where they lie (no concatenation, no re-normalisation)."""

    def __init__(self, sources: Sources, keep: int, capacity: int):
        self.sources, self.keep = sources, min(keep, sources.n)
        size, device = capacity * self.keep, sources.rep.embed.device
        self.ids = torch.empty(capacity, dtype=torch.long, device=device)  # the rows' feature nodes
        self.cols = Columns(capacity, self.keep, sources.n, device)  # each edge's source column, ascending
        self.values = torch.empty(size, dtype=sources.rep.embed.dtype, device=device)
        self.totals = torch.empty(capacity, dtype=self.values.dtype, device=device)  # each row's |input|
        self.filled = 0  # rows
        self.kept_mass: list[torch.Tensor] = []  # [k] per batch: the share of |row| kept

    def out(self, start: int, stop: int) -> None:
        return None

    def add(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        magnitude = rows.abs()
        top = magnitude.topk(self.keep, dim=1, sorted=False)  # [k, keep]
        totals = magnitude.sum(1, keepdim=True).clamp(min=1e-10)  # as normalize_matrix
        cols = top.indices.sort(dim=1).values  # [k, keep] in column order
        span = slice(self.filled, self.filled + len(ids))
        self.ids[span], self.totals[span] = ids, totals[:, 0]
        self.cols.put(span, cols)
        self.values[span.start * self.keep : span.stop * self.keep] = rows.gather(1, cols).flatten()
        self.filled = span.stop
        self.kept_mass.append(top.values.sum(1) / totals[:, 0])

    def influence(self, direct: torch.Tensor) -> torch.Tensor:
        """`DenseRows.influence` on the kept edges, each normalised by its row's whole input as it is
        read (the influence that reaches errors and tokens goes no further: it is dropped)."""
        n, r = len(direct), self.filled
        weights = torch.cat([direct, direct.new_zeros(self.sources.n - n)])  # edges reach every source column
        values = self.values[: r * self.keep].view(r, self.keep)
        return direct + edge_influence(self.ids[:r], self.cols.get, values, weights, self.totals[:r])[:n]

    def graph_adjacency(self, selected: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        """The sparse adjacency of the graph over the selected features and every other node: the
        kept edges of the feature rows, every nonzero edge of the logit rows."""
        n, n_sources, k = self.sources.n_features, self.sources.n, len(selected)
        kept_mass = torch.cat(self.kept_mass)
        log.info("feature rows keep %.1f%% of their absolute input on average (least %.1f%%)",
                 100 * kept_mass.mean().item(), 100 * kept_mass.min().item())  # fmt: skip
        position = torch.full((n_sources,), -1, dtype=torch.int32, device=selected.device)
        position[selected] = torch.arange(k, dtype=torch.int32, device=selected.device)
        position[n:] = torch.arange(k, k + n_sources - n, dtype=torch.int32, device=selected.device)
        parts = self._kept_edges(position)
        logit_targets, logit_sources = logit_rows.nonzero(as_tuple=True)  # by target then source
        logit_values, logit_sources = logit_rows[logit_targets, logit_sources], position[logit_sources]
        logit_keep = (logit_sources >= 0) & (logit_values != 0)
        first_logit = k + n_sources - n
        parts.append((first_logit + logit_targets[logit_keep], logit_sources[logit_keep], logit_values[logit_keep]))
        indices, values = _stacked(parts)
        N = first_logit + len(logit_rows)
        return torch.sparse_coo_tensor(indices.cpu(), values.cpu(), (N, N), check_invariants=False, is_coalesced=True)

    def _kept_edges(self, position: torch.Tensor, chunk: int = EDGES_AT_ONCE) -> list[tuple[torch.Tensor, ...]]:
        """The kept edges between nodes of the graph, `position` [sources]: each source's node in the
        graph (-1: dropped), as parts (targets, sources, values) in the order of a coalesced matrix,
        by target then source (no copy to sort them afterwards); rows of about `chunk` edges at a
        time, so that the temporaries are of that size, not of all kept edges (most go to dropped
        features)."""
        r, keep = self.filled, self.keep
        rows = position[self.ids[:r]]  # every computed row is a selected feature
        rows, by_target = rows.sort()
        values_kept = self.values[: r * keep].view(r, keep)
        parts = []
        for at, ids in zip(rows.split(max(1, chunk // keep)), by_target.split(max(1, chunk // keep)), strict=True):
            cols = position[self.cols.get(ids)]  # [rows, keep] -1: dropped; ascending where kept (as the columns)
            values = values_kept[ids]
            kept = (cols >= 0) & (values != 0)
            parts.append((at[:, None].expand_as(cols)[kept], cols[kept], values[kept]))
        return parts


class Columns:
    """The source columns of the sparse rows' kept edges, `keep` per row in ascending order, in 2
    bytes each (int32 would take 4): a column's offset in its run of 2^16 columns (int16, from
    -2^15), and per row the first edge in each later run ([rows, runs - 1] int32; no runs on prompts
    of fewer than 65,536 sources)."""

    def __init__(self, capacity: int, keep: int, n_sources: int, device: str | torch.device):
        self.keep = keep
        self.low = torch.empty(capacity, keep, dtype=torch.int16, device=device)
        self.runs = torch.empty(capacity, (n_sources - 1) >> 16, dtype=torch.int32, device=device)
        self.starts = torch.arange(1, self.runs.shape[1] + 1, device=device) << 16  # [runs - 1] their first columns

    def put(self, rows: slice, cols: torch.Tensor) -> None:
        """Store the columns cols [k, keep] (ascending in each row) of `rows`."""
        self.low[rows] = (cols & 0xFFFF) - 2**15
        self.runs[rows] = torch.searchsorted(cols, self.starts.expand(len(cols), -1).contiguous())

    def get(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The columns of `rows` (a slice or row indices): [rows, keep] int32."""
        cols = self.low[rows].int().add_(2**15)
        edge = torch.arange(self.keep, device=cols.device)  # [keep]
        for first in self.runs[rows].T:  # [rows] each row's first edge in the next run
            cols.add_(edge >= first[:, None], alpha=2**16)
        return cols


def _stacked(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges in parts (targets, sources, values) -> (indices [2, nnz] long, values [nnz]) of a COO
    matrix, each part dropped once copied: the edges are held twice at most, not three times."""
    nnz, like = sum(len(part[2]) for part in parts), parts[0][2]
    indices = torch.empty(2, nnz, dtype=torch.long, device=like.device)
    values, at = like.new_empty(nnz), 0
    while parts:
        targets, sources, part = parts.pop(0)
        span = slice(at, at + len(part))
        indices[0, span], indices[1, span], values[span] = targets, sources, part
        at = span.stop
    return indices, values


def _feature_rows(
    sources: Sources,
    store: DenseRows | SparseRows,
    logit_rows: torch.Tensor,
    targets: list[LogitTarget],
    cap: int,
    cfg: AttributionConfig,
    progress: bool,
) -> torch.Tensor:
    """Compute the rows of the feature nodes into `store` (`logit_rows` [T, sources]: the targets'):
    all of them, or the `cap` most influential ones, chosen batch by batch from the influence
    estimated on the rows computed so far. Returns the computed features [cap], sorted."""
    rep, n = sources.rep, sources.n_features
    layer, pos, feature = rep.features.T
    W_enc = rep.clt.W_enc.detach()

    def compute(batch: torch.Tensor) -> None:
        """The rows of the features `batch` [k] (ascending), backward passes of at most `step` rows
        per layer among them."""
        for l in layer[batch].unique().tolist():
            for at in batch[layer[batch] == l].split(step):
                start, stop = int(at[0]), int(at[-1]) + 1
                vec = rep.encoder_vectors(l, pos[at], W_enc[l, feature[at]])  # [k, d] at resid_mid
                out = store.out(start, stop) if stop - start == len(at) else None  # a contiguous run: in place
                store.add(at, sources.rows(l, pos[at], vec, out=out))
                if isinstance(store, SparseRows):  # long prompts, where memory binds (short ones: time)
                    release_heap()
                bar.update(len(at))

    bar = tqdm(total=cap, desc="attribution", unit="feature", disable=not progress)
    if cap == n:  # one layer per batch, in (layer, position) order: the batch sees few positions
        for l in range(sources.L):
            step = batch_size(sources, cfg, l)
            compute((layer == l).nonzero()[:, 0])
        bar.close()
        return torch.arange(n, device=layer.device)
    # the influence estimate: the targets' direct shares, then through the computed rows
    probs = torch.tensor([t.prob for t in targets], dtype=logit_rows.dtype, device=logit_rows.device)
    direct = probs @ normalize_matrix(logit_rows)[:, :n]  # [n]
    done = torch.empty(0, dtype=torch.long, device=layer.device)
    step = batch_size(sources, cfg, sources.L - 1)
    chosen = rows_per_renewal(cfg, step, cap)  # features chosen per estimate
    while len(done) < cap:
        influence = store.influence(direct)
        influence[done] = -1
        batch = influence.topk(min(chosen, cap - len(done))).indices.sort().values
        compute(batch)
        done = torch.cat([done, batch])
    bar.close()
    return done.sort().values


def _feature_influence(direct: torch.Tensor, normalized: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """Influence of every feature on the targets through the rows computed so far: [n_features],
    from the targets' direct shares [n] and the computed features `done` [k] with their normalised
    rows [k, n]. Only those rows pass influence on, so the series runs on them alone, never on the
    N x N matrix."""
    return direct + compute_influence(normalized, direct[done], done)
