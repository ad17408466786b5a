"""The memory and time an attribution will take, predicted before any of its work: one forward pass
counts the active features at each layer and position, and the sizes of what `attribute` holds
follow from the shapes.

What the prediction adds up (numbers of float32s unless said; P tokens, L layers, H heads, d =
d_model, F features per layer, n active, k kept, T targets, S = n + (L + 1) P sources, B rows per
backward pass, E = k * edges_per_row kept edges), the largest of four phases on top of what is held
throughout (the embedding images P^2 d when built, ~16 L P d of activations):
- freezing the prompt: the attention patterns and their stacked copy 2 L H P^2, or the last layer's
  scores and pattern with the others', or the patterns and the pre-activations and activations
  3 P L F; from here on the patterns and their transposed copy 2 L H P^2 are held;
- laying out the sources: the features' decoder writes (n times the layers each writes to, times
  d) and their copy, per position over every layer (n L d, thin features on short prompts) or in
  zero-padded blocks of one position (`block_width`), made from the decoder a layer at a time as
  that layer's writes are dropped (`_block_floats`); after the logit rows the blocks keep only what
  is written below the last layer;
- the rows, one backward pass at a time: its gradients B P (L - 1) d at the transcoder outputs and
  ~2 B P d while walking down, the rows B S (twice on the sparse path), the blocks' products and
  the gradients gathered for them; and the rows kept: dense, the touched rows (k + T) S and the
  normalised estimate k n; sparse, E edges of a value and a 2-byte column (1.5 numbers);
- assembling the graph, the blocks dropped unless `inhibited` needs them: dense, its kept part
  (k + L P + P + T)^2 and the rows of the kept features k (S + k + L P + P); sparse, the E kept
  edges and those of them between the graph's nodes (E times the share of sources kept), 8 numbers
  each in parts and in the COO matrix's arrays; with `inhibited`, or one more backward pass over the
  rows held, before the assembly (whichever is larger).

The time (`Work`) follows the same choices phase by phase: the multiply-adds of the freeze, of each
backward pass's walk (terms or dense attention, as `attention_backward_cost` decides) and of its
contraction with the blocks, at the rate of a matrix product measured now; the rest (gathering,
finding each sparse row's largest edges, renewing the influence estimate, assembling the graph) at
seconds per unit fitted on this project's machine (`SECONDS_PER`), scaled by the same rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
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
from circuits.attribution.replacement import attention_backward_cost, record_forward
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens
from circuits.transcoders.clt import CrossLayerTranscoder

ESTIMATE_FROM_TOKENS = 512
"""`circuits trace` estimates prompts from this many tokens on before attributing them (shorter ones
only under --max-memory): the estimate's forward pass is paid again by the attribution, and below
this the attribution's memory is small next to the model's."""

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class Estimate:
    tokens: int
    active_features: int
    kept_features: int
    sparse: bool
    memory_bytes: int
    """Predicted growth of the process's peak resident memory during the attribution."""
    baseline_bytes: int
    """The process's resident memory before it (model and transcoder loaded)."""
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.memory_bytes

    def line(self) -> str:
        path = "sparse" if self.sparse else "dense"
        return (
            f"{self.tokens:,} tokens, {self.active_features:,} active features, {self.kept_features:,} kept "
            f"({path} graph): predicted peak memory {self.peak_bytes / 1e9:.2f} GB "
            f"({self.memory_bytes / 1e9:.2f} GB for the attribution), time ~{self.seconds:,.0f} s"
        )


def parse_size(text: str) -> int:
    """'8GB', '512MB', '2GiB', '1e9' -> bytes."""
    number = text.strip().lower().rstrip("s")
    unit = number.lstrip("0123456789.e+")
    try:
        return int(float(number[: len(number) - len(unit)]) * _UNITS[unit.strip()])
    except (KeyError, ValueError):
        raise CircuitsError(f"memory size {text!r} is not a size: write e.g. 8GB, 512MB or 2GiB") from None


def _proc_kib(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a /proc file, in bytes (None where there is no /proc)."""
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def available_bytes() -> int:
    """What this process may still take: MemAvailable of /proc/meminfo (or physical memory)."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 2**62


def resident_bytes() -> int:
    """This process's resident memory now."""
    return _proc_kib("/proc/self/status", "VmRSS") or 0


@torch.no_grad()
def count_active(model: HookedTransformer, transcoder: CrossLayerTranscoder, tokens: torch.Tensor) -> torch.Tensor:
    """The active features of the prompt tokens [P] at each layer and position, [L, P]: one forward
    pass, encoded layer by layer."""
    x = record_forward(model, tokens).at(transcoder.cfg.input_hook)  # [L, P, d]
    W_enc = transcoder.W_enc
    L = transcoder.cfg.n_layers
    return torch.stack([(transcoder.encode_layer(x[l].to(W_enc.dtype), l) != 0).sum(-1) for l in range(L)]).cpu()


def estimate(
    prompt: str,
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    config: AttributionConfig | None = None,
    **overrides,
) -> Estimate:
    """The predicted peak memory and time of `attribute(prompt, model, transcoder, config, **overrides)`,
    from one forward pass (no attribution)."""
    cfg = replace(config or AttributionConfig(), **overrides)
    tokens = prompt_tokens(model, prompt)[0].to(model.W_U.device)
    counts = count_active(model, transcoder, tokens)  # [L, P]
    n = int(counts.sum())
    m, c = model.cfg, transcoder.cfg
    P, L, H, d, dh, F = len(tokens), m.n_layers, m.n_heads, m.d_model, m.d_head, c.n_features
    k = n if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n)
    T, S = cfg.max_targets, n + (L + 1) * P
    sparse = sparse_graph(k, T, S, cfg)
    written = [L - s if c.cross_layer else 1 for s in range(L)]  # the layers each source layer writes to
    below = [written_below_last(L, s, c.cross_layer) for s in range(L)]  # ... below the last one
    writes = sum(int(counts[s].sum()) * written[s] for s in range(L)) * d
    merged = n < cfg.merge_below * L * P and n * L * d <= cfg.dense_floats
    widths, padded = zip(*(block_width(counts[s]) for s in range(L)), strict=True)
    if merged:  # the writes and their copy per position over every layer, held from the layout on
        laying_out = sources = writes + n * L * d
    else:
        laying_out, sources = _block_floats(counts, padded, written, below, d)
    held = 16 * L * P * d + (P * P * d if has_embedding_images(cfg, P, d) else 0)
    patterns = 2 * L * H * P * P  # and their transposed copy, from the end of the freeze on
    freeze = max(patterns, (L + 2) * H * P * P, L * H * P * P + 3 * P * L * F)
    B = rows_per_pass(cfg, P, d, L - 1)
    backward = B * P * (L + 1) * d + B * S * (2 if sparse else 1)
    if not merged:  # the blocks' products, and the gradients gathered for them (at most work_floats)
        backward += max(
            p * B + min(cfg.work_floats, p // w * B * t * d) for p, w, t in zip(padded, widths, below, strict=True)
        )
    E = k * min(cfg.edges_per_row, S)
    if sparse:  # the kept edges (value, 2-byte column); the graph's share of them in parts, then as COO arrays
        graph_edges = E * min(1.0, (k + (L + 1) * P + T) / S)
        rows = E + E // 2
        assemble = rows + int(8 * graph_edges) + 6 * EDGES_AT_ONCE
    else:
        N_kept = k + (L + 1) * P + T
        rows = (k + T) * S + (k * n if k < n else 0)
        assemble = rows + (N_kept**2 + k * (S + N_kept) if k < n else 0)
    if cfg.inhibited:  # the inhibited features' backward passes come before it, the rows held
        assemble = max(assemble, rows + backward)
    assembling = sources if merged or cfg.inhibited else 0  # the blocks are dropped before the assembly
    floats = held + max(
        freeze, patterns + laying_out, patterns + sources + backward + rows, patterns + assembling + assemble
    )
    size = torch.empty(0, dtype=getattr(torch, cfg.dtype)).element_size()
    work = Work(counts, d, H, dh, m.d_mlp, F, c.cross_layer, k, T, sparse, cfg)
    return Estimate(P, n, k, sparse, int(floats * size), resident_bytes(), work.seconds(flops_per_second()))


def _block_floats(
    counts: torch.Tensor, padded: tuple[int, ...], written: list[int], below: list[int], d: int
) -> tuple[int, int]:
    """The blocks of the features (`attribute.LayerBlocks`), `padded` rows of each source layer that
    writes to `written` layers, as floats: (their peak while laid out, what they hold from the logit
    rows on). Each layer's blocks are made from the decoder, DECODER_ROWS_AT_ONCE features at a time, once that
    layer's writes are dropped: the blocks of the layers up to it are held with the writes of those
    above. After the logit rows the blocks keep only the `below` layers under the last one."""
    n_s = [int(c.sum()) for c in counts]
    writes = [n * w * d for n, w in zip(n_s, written, strict=True)]
    blocks = [p * w * d for p, w in zip(padded, written, strict=True)]
    chunk = [min(DECODER_ROWS_AT_ONCE, n) * w * d for n, w in zip(n_s, written, strict=True)]
    peak = max(sum(blocks[: s + 1]) + sum(writes[s + 1 :]) + chunk[s] for s in range(len(n_s)))
    return peak, sum(p * b * d for p, b in zip(padded, below, strict=True))


SECONDS_PER = {
    "gathered float": 1.3e-9,  # the gradients gathered by position for the contraction's products
    "searched float": 15e-9,  # a sparse row's largest edges found (topk, totals, gather), per source
    "influence edge": 10e-9,  # one term of the influence series over one kept edge
    "assembled edge": 90e-9,  # a kept edge into the graph (sorted, gathered, masked, logit rows)
    "stored float": 1.3e-9,  # a dense row written, or the dense graph's kept part copied
    "active feature": 15e-6,  # its decoder writes laid out, by position and layer
    "token": 1e-3,  # the constant terms and the graph's assembly per token
}
"""Seconds per unit of the work that is not a matrix product: fitted to cProfile's time per phase of
attributions of 512, 1,024 and 2,048 tokens on the random model of `scripts/bench_attribution.py
--long` (one thread of this project's 2-core machine, 95 GFLOP/s in matrix products), and scaled by
this machine's matrix-product rate now."""
REFERENCE_FLOPS = 95e9
WALK_SHARE = 0.6
"""The walk's products run faster than its multiply-adds at that rate predict (measured 0.5-1.2x)."""


def flops_per_second() -> float:
    """The rate of a [1024, 256] x [256, 1024] product on this machine now (the median of seven after
    one: on a shared machine it shares the cores as the attribution will)."""
    a, b = torch.randn(1024, 256), torch.randn(256, 1024)
    a @ b
    seconds = []
    for _ in range(7):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return 2 * 1024 * 256 * 1024 / max(sorted(seconds)[3], 1e-9)


@dataclass
class Work:
    """The work of an attribution as counts of multiply-adds, floats moved, searched and sorted and
    influence edges, phase by phase, following the choices `attribute` makes (batch sizes, the walk's
    terms or dense attention, the blocks of the contraction); kept rows are assumed spread over the
    layers like the active features and, with a cap, to reach the last position. `counts` [L, P]:
    the active features at each layer and position."""

    counts: torch.Tensor
    d: int
    H: int
    dh: int
    d_mlp: int
    F: int
    cross_layer: bool
    kept: int
    T: int
    sparse: bool
    cfg: AttributionConfig

    def seconds(self, flops: float) -> float:
        """At `flops` per second in matrix products (the rest scaled to it from `SECONDS_PER`)."""
        L, P = self.counts.shape
        d, n, c = self.d, int(self.counts.sum()), SECONDS_PER
        freeze = 2 * P * L * (4 * d * self.H * self.dh + 2 * d * self.d_mlp + 2 * d * self.F)
        freeze += 4 * L * self.H * P * P * self.dh
        macs = gathered = 0
        for t, B, Pp in self.batches():
            contract, floats = self.contract_work(t, B, Pp)
            macs, gathered = macs + WALK_SHARE * B * self.walk_macs(t, Pp) + contract, gathered + floats
        rows = (self.kept + self.T) * (n + (L + 1) * P)
        rest = (
            gathered * c["gathered float"]
            + rows * c["searched float" if self.sparse else "stored float"]
            + self.influence_edges() * c["influence edge"]
            + self.assembled() * c["assembled edge" if self.sparse else "stored float"]
            + n * c["active feature"]
            + P * c["token"]
        )
        return (freeze + 2 * macs) / flops + rest * REFERENCE_FLOPS / flops

    def steps(self) -> tuple[int, int]:
        """Rows per backward pass (with a cap) and rows chosen per renewal of the influence estimate."""
        L, P = self.counts.shape
        step = rows_per_pass(self.cfg, P, self.d, L - 1)
        return step, rows_per_renewal(self.cfg, step, self.kept)

    def batches(self) -> list[tuple[int, int, int]]:
        """(layer, rows, positions seen) of every backward pass, the logits' last."""
        L, P = self.counts.shape
        cfg, n, out = self.cfg, int(self.counts.sum()), []
        if self.kept == n:  # a layer at a time in position order: a pass sees up to its last row's position
            for t in range(L):
                step = rows_per_pass(cfg, P, self.d, t)
                ends = self.counts[t].cumsum(0)  # [P]
                total = int(ends[-1])
                for a in range(0, total, step):
                    last = min(a + step, total) - 1
                    out.append((t, min(step, total - a), int(torch.searchsorted(ends, last, right=True)) + 1))
        else:  # rounds of `chosen` rows, split by layer into passes of `step` rows
            step, chosen = self.steps()
            share = (self.counts.sum(1) / n).tolist()  # [L]
            for a in range(0, self.kept, chosen):
                for t in range(L):
                    rows = round(min(chosen, self.kept - a) * share[t])
                    out += [(t, min(step, rows - b), P) for b in range(0, rows, step)]
        return out + [(L, self.T, P)]

    def walk_macs(self, t: int, Pp: int) -> int:
        """Multiply-adds per row of `Sources._walk_down` from layer t over P' positions: the attention
        backward of each layer below, as a sum of terms while that is cheaper (J grows (H + 1)-fold),
        then dense (its projections on the positions the rows see, about half)."""
        L = len(self.counts)
        macs, J = 0, 1 if self.cfg.backward_terms else None
        images = has_embedding_images(self.cfg, self.counts.shape[1], self.d)  # built for the whole prompt
        for _ in range(min(t, L - 1) + (0 if images else 1)):  # layer 0 too without the embeddings' images
            terms, dense = attention_backward_cost(J or 1, Pp, self.H, self.dh, self.d)
            if J is not None and terms < dense:
                macs, J = macs + terms, J * (self.H + 1)
                J = J if attention_backward_cost(J, Pp, self.H, self.dh, self.d)[0] < dense else None
            else:
                macs, J = macs + dense - Pp * self.d * self.H * self.dh, None
        return macs

    def contract_work(self, t: int, B: int, Pp: int) -> tuple[int, int]:
        """Multiply-adds and floats gathered of `Sources._contract` for B rows of layer t over P'
        positions: each lower layer's blocks (zero-padded features of one position, `block_width`)
        against the gradients gathered for them; the errors; the embeddings."""
        macs = floats = 0
        for s in range(t):
            counts = self.counts[s, :Pp]
            width, _ = block_width(self.counts[s])
            blocks = int(((counts + width - 1) // width).sum())
            written = t - s if self.cross_layer else 1
            macs += blocks * width * B * written * self.d
            floats += blocks * B * written * self.d
        images = has_embedding_images(self.cfg, self.counts.shape[1], self.d)
        return macs + B * t * Pp * self.d + B * Pp * self.d * (Pp if images else 1), floats

    def influence_edges(self) -> int:
        """Edges through which the renewals of the influence estimate pass (with a cap): those of the
        rows computed so far, once per term of the series (at most a term per layer) and once more to
        lay them out."""
        L, P = self.counts.shape
        n = int(self.counts.sum())
        if self.kept == n:
            return 0
        _, chosen = self.steps()
        done = sum(range(0, self.kept, chosen))  # rows computed before each renewal, summed
        per_row = min(self.cfg.edges_per_row, n + (L + 1) * P) if self.sparse else n
        return done * per_row * (L + 2)

    def assembled(self) -> int:
        """What assembling the graph handles: sparse, the kept edges; dense, the kept part's floats."""
        L, P = self.counts.shape
        if self.sparse:
            return self.kept * min(self.cfg.edges_per_row, int(self.counts.sum()) + (L + 1) * P)
        return (self.kept + (L + 1) * P + self.T) ** 2


def check_memory(est: Estimate, limit: int | None = None) -> None:
    """Refuse, in one line, an attribution whose predicted peak exceeds `limit` bytes (None: the
    memory available to this process now)."""
    if limit is not None and est.peak_bytes > limit:
        raise CircuitsError(
            f"this attribution needs about {est.peak_bytes / 1e9:.1f} GB ({est.line()}), over the limit of "
            f"{limit / 1e9:.1f} GB: pass a smaller --max-feature-nodes or a shorter prompt, or raise --max-memory"
        )
    available = available_bytes()
    if limit is None and est.memory_bytes > available:
        raise CircuitsError(
            f"this attribution needs about {est.memory_bytes / 1e9:.1f} GB more memory but {available / 1e9:.1f} GB "
            f"is available ({est.line()}): pass a smaller --max-feature-nodes or a shorter prompt"
        )
