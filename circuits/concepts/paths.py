"""Multi-hop path scores: how well a chain of concepts (Dallas -> Texas -> Austin) shows up in their
traces, scored from each concept's peak cell (layer, position) and its order along the prompt.

The logit lens says where a concept can be read; patching says whether that cell matters. With a
patching result, each hop also carries the recovery at its peak cell, and the path a causal score:
the lens score times the mean recovery (clipped to [0, 1]) of its hops. A hop where the two disagree
(read by the lens, rank <= top_k, but recovering < CAUSAL_THRESHOLD, or the reverse) is flagged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from circuits.errors import CircuitsError

if TYPE_CHECKING:
    from circuits.concepts.lens import ConceptTrace
    from circuits.concepts.patching import PatchingResult

CAUSAL_THRESHOLD = 0.5  # a peak cell whose patch recovers at least this fraction of the answer is causal


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
    top_k: int = 5
    recoveries: list[float] | None = None  # per hop: patching recovery at its peak cell
    causal_score: float | None = None  # score x mean clipped recovery

    @property
    def in_order(self) -> bool:
        return self.ordered_by_position and self.ordered_by_layer

    @property
    def agrees(self) -> list[bool] | None:
        """Per hop: the lens (rank <= top_k at the peak) and patching (recovery >= CAUSAL_THRESHOLD) agree."""
        if self.recoveries is None:
            return None
        return [
            (r <= self.top_k) == (c >= CAUSAL_THRESHOLD) for r, c in zip(self.peak_ranks, self.recoveries, strict=True)
        ]


def cell_recovery(result: PatchingResult, row: int, pos: int) -> float:
    """The recovered fraction when the clean residual stream at trace cell (row, pos) is patched in: row
    r < L is block r's resid_pre (the grid); row L is the final residual, which feeds only the logits at
    its own position, so patching it recovers all of the difference at the last position and none elsewhere."""
    grid = result.grids.get("resid_pre")
    if grid is None:
        raise CircuitsError("the patching result has no resid_pre grid: patch with kinds including 'resid_pre'")
    if row < grid.shape[0]:
        return float(grid[row, pos])
    return 1.0 if pos == grid.shape[1] - 1 else 0.0


def with_causal(path: PathScore, patching: PatchingResult) -> PathScore:
    """The path with each hop's recovery at its peak cell and the causal score filled in."""
    path.recoveries = [cell_recovery(patching, row, pos) for row, pos in path.peaks]
    path.causal_score = path.score * sum(min(max(r, 0.0), 1.0) for r in path.recoveries) / len(path.recoveries)
    return path


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
        top_k=top_k,
    )


def rank_paths(
    traces: dict[str, ConceptTrace], paths: list[list[str]], n_layers: int, patching: PatchingResult | None = None
) -> list[PathScore]:
    """Every path scored (with a patching result, causally too), best (highest logit-lens score) first."""
    scored = [score_path(traces, p, n_layers) for p in paths]
    if patching is not None:
        scored = [with_causal(s, patching) for s in scored]
    return sorted(scored, key=lambda s: -s.score)
