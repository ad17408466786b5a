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
  zero-padded blocks of one position (`block_width`; the writes are then dropped);
- the rows, one backward pass at a time: its gradients B P (L - 1) d at the transcoder outputs and
  ~2 B P d while walking down, the rows B S (twice on the sparse path), the blocks' products and
  the gradients gathered for them; and the rows kept: dense, the touched rows (k + T) S and the
  normalised estimate k n; sparse, E edges of 3 numbers;
- assembling the graph: dense, its kept part (k + L P + P + T)^2 and the rows of the kept features
  k (S + k + L P + P); sparse, about 17 numbers an edge (the edges sorted by target and source,
  masks, the index arrays of the COO matrix); then, with `inhibited`, one more backward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.config import AttributionConfig, block_width, sparse_graph
from circuits.attribution.replacement import record_forward
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
    writes = sum(int(counts[s].sum()) * written[s] for s in range(L)) * d
    merged = n < cfg.merge_below * L * P and n * L * d <= cfg.dense_floats
    widths, padded = zip(*(block_width(counts[s]) for s in range(L)), strict=True)
    layout = n * L * d if merged else sum(p * w for p, w in zip(padded, written, strict=True)) * d
    held = 16 * L * P * d + (P * P * d if P * P * d <= cfg.embedding_image_floats else 0)
    patterns = 2 * L * H * P * P  # and their transposed copy, from the end of the freeze on
    sources = layout + (writes if merged else 0)  # held from the layout on
    freeze = max(patterns, (L + 2) * H * P * P, L * H * P * P + 3 * P * L * F)
    B = cfg.batch_size or max(cfg.min_batch, cfg.work_floats // (P * (L + 1) * d))
    backward = B * P * (L + 1) * d + B * S * (2 if sparse else 1)
    if not merged:  # the blocks' products, and the gradients gathered for them (at most work_floats)
        backward += max(
            p * B + min(cfg.work_floats, p // w * B * t * d) for p, w, t in zip(padded, widths, written, strict=True)
        )
    E = k * min(cfg.edges_per_row, S)
    if sparse:
        rows, assemble = 3 * E, 17 * E
    else:
        N_kept = k + (L + 1) * P + T
        rows = (k + T) * S + (k * n if k < n else 0)
        assemble = rows + (N_kept**2 + k * (S + N_kept) if k < n else 0)
    assemble += backward if cfg.inhibited else 0  # the inhibited features' backward passes come after it
    floats = held + max(
        freeze, patterns + writes + layout, patterns + sources + backward + rows, patterns + sources + assemble
    )
    size = torch.empty(0, dtype=getattr(torch, cfg.dtype)).element_size()
    # time: multiply-adds per row (the attention backward below the row's layer at every position,
    # and the contraction with the sources) at the rate of a matrix product of this machine
    per_row = L * (4 * P * d * H * dh + 2 * H * P * P * dh) + 2 * writes
    seconds = (k + T) * per_row / _flops_per_second(d)
    return Estimate(P, n, k, sparse, int(floats * size), resident_bytes(), seconds)


def _flops_per_second(d: int) -> float:
    """The rate of a [256, d] x [d, 4d] product on this machine now (best of three; about 10 ms)."""
    a, b = torch.randn(256, d), torch.randn(d, 4 * d)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 256 * d * 4 * d / max(best, 1e-9)


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
