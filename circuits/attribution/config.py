"""`AttributionConfig`: the options of an attribution, and the rules choosing a dense or sparse graph
and the contraction's blocks (`attribute` and `estimate` both follow them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECODER_ROWS_AT_ONCE = 4096
"""Features whose writes the contraction's blocks are made of at a time (`attribute.LayerBlocks.of`;
`estimate` counts that temporary)."""
EDGES_AT_ONCE = 2**18
"""Kept edges a sparse graph is assembled from at a time (`attribute.SparseRows`; `estimate` counts
those temporaries)."""


@dataclass
class AttributionConfig:
    batch_size: int | None = None
    """Targets per backward pass (None: as many as fit in `work_floats` of gradients)."""
    max_feature_nodes: int | None = 8192
    """Keep at most this many feature nodes, the most influential ones, chosen as the rows are computed
    (None: every active feature). The default bounds time and memory on long prompts, where the active
    features run into the hundreds of thousands (330k on 4,096 tokens at 20 per layer and position);
    the log says when it caps."""
    target_probability: float = 0.95
    """Default targets: the top logits covering this much probability..."""
    max_targets: int = 10
    """...but at most this many."""
    dtype: str = "float32"
    device: str = "cpu"
    targets: list[str] = field(default_factory=list)
    """Named targets: tokens, or 'A-B' for the logit difference of tokens A and B (empty: default)."""
    inhibited: int = 0
    """Also report this many inactive features at the last position that the graph's feature nodes
    push down hardest (`Graph.inhibited`)."""
    work_floats: int = 2**22
    """The gradients of one backward pass hold about this many numbers (16 MB in float32): the batch
    size when `batch_size` is None..."""
    min_batch: int = 32
    """...but at least this many: every batch reads all the sources' writes once (800 MB on 4,096
    tokens), so batches of one row on long prompts would be bound by that reading."""
    merge_below: int = 32
    """With fewer active features per (layer, position) on average, the contraction takes one product per
    position over the features of every layer there (wasting the zeros below each feature's layer: up
    to half the work) instead of batched products per layer over blocks of one position (measured
    against one product per (layer, position), before the blocks: 64 tokens, 21 features: 10 against
    15 ms a batch; 12 tokens, 77 features: 17 against 10.5 ms)."""
    backward_terms: bool = True
    """Carry gradients as short sums of terms while that is cheaper (`Replacement.terms_are_cheaper`);
    False: the dense attention backward everywhere (the same edges, the slower reference path)."""
    selection_rounds: int = 16
    """With a cap, the influence estimate is renewed after each batch, or at most this many times
    (then each round computes several batches): on long prompts each renewal reads every kept edge."""
    dense_floats: int = 2**26
    """The graph is built dense while the rows it computes over every source, (kept features +
    targets) x sources, hold at most this many numbers (256 MB in float32; then it is faster); beyond,
    each row is reduced to its `edges_per_row` largest edges as it comes and the graph is sparse."""
    edges_per_row: int = 8192
    """Sparse graphs: the edges each feature row keeps, its largest by |weight| (the logit rows keep
    all). Rows are normalised by their whole absolute input, so influence is not inflated by the cut."""
    single_pass_span: int = 8
    """With every feature kept, `batch_size` None and a dense graph, all rows are computed in one walk
    down the layers (`circuits.attribution.single_pass`), in runs of the rows at this many positions (a
    run below position P' carries gradients over P' positions: the zeros after each row's own position
    cost at most a span; each run in pieces of `work_floats`). Measured on the demo CLT at ~21 features
    per layer and token, one thread, against the batched path: faster from 8 to 96 tokens (168 vs 174 ms
    at 32, 493 vs 650 ms at 64, 980 vs 1,516 ms at 96), and no slower for spans 8 or 16 at 32 tokens."""
    embedding_image_floats: int = 2**24
    """Largest P * P * d_model for which `Replacement.embedding_images` is built (64 MB in float32);
    longer prompts pass every gradient through layer 0 instead."""


def rows_per_pass(cfg: AttributionConfig, n_pos: int, d_model: int, layer: int) -> int:
    """Targets per backward pass into `layer`: `cfg.batch_size`, or as many as `work_floats` of
    gradients hold."""
    return cfg.batch_size or max(cfg.min_batch, cfg.work_floats // (n_pos * (layer + 2) * d_model))


def rows_per_renewal(cfg: AttributionConfig, step: int, kept: int) -> int:
    """With a cap of `kept` features: the features chosen per renewal of the influence estimate (at
    least a pass of `step` rows, at most `selection_rounds` renewals)."""
    return max(step, -(-kept // cfg.selection_rounds))


def has_embedding_images(cfg: AttributionConfig, n_pos: int, d_model: int) -> bool:
    """Whether `Replacement.embedding_images` is built for a prompt of `n_pos` tokens."""
    return n_pos * n_pos * d_model <= cfg.embedding_image_floats


def written_below_last(n_layers: int, layer: int, cross_layer: bool) -> int:
    """How many layers below the last one the features of source `layer` write to: what the blocks
    of the contraction keep once the logit rows, the only readers of the last layer's writes, are
    done."""
    return n_layers - 1 - layer if cross_layer else int(layer < n_layers - 1)


def sparse_graph(kept: int, n_targets: int, n_sources: int, cfg: AttributionConfig) -> bool:
    """Whether the graph is built sparse: when the rows it computes, (kept + targets) x sources, hold
    more than `cfg.dense_floats` numbers, or its N x N matrix (reserved, touched where written) more
    than 16 times that."""
    N = n_sources + n_targets
    return (kept + n_targets) * n_sources > cfg.dense_floats or N * N > 16 * cfg.dense_floats


def block_width(counts: torch.Tensor) -> tuple[int, int]:
    """The width of the blocks one source layer's features are cut into for the contraction (at most
    `width` features of one position each, zero-padded; `attribute.LayerBlocks`), from the number of
    features at each position, counts [P]: the widest of 8, 16, ..., 64 that pads them by at most a
    fifth (wider blocks make faster products, padding costs memory and work). Returns (width, padded
    number of rows)."""
    n = int(counts.sum())
    for width in range(64, 8, -8):
        padded = int(((counts + width - 1) // width).sum()) * width
        if padded <= 1.2 * n:
            return width, padded
    return 8, int(((counts + 7) // 8).sum()) * 8
