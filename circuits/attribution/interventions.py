"""Interventions on the real model with the CLT spliced in place of its MLPs: ablate or steer
features and read the logits; check a graph's predictions against them.

The CLT reads and writes at its own hooks (see `splice.py`). The spliced model adds each (layer,
position)'s error term (the real value at the CLT's output hook - its reconstruction on the clean
prompt) as a constant, so without interventions it reproduces the real model exactly.
Downstream features are recomputed by the CLT encoder, so an ablation's effect propagates through
their nonlinearity; with `freeze_attention` the attention patterns and norm scales keep their clean
values (the regime the graph linearises), without it they are recomputed too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.splice import clean_state, splice_hooks
from circuits.attribution.targets import resolve_targets
from circuits.transcoders.clt import CrossLayerTranscoder


@dataclass
class Intervention:
    layer: int
    pos: int
    feature: int
    value: float | None = None
    """Set the activation to this value (0: ablate)."""
    scale: float | None = None
    """Or multiply the activation by this factor."""


@torch.no_grad()
def run_with_interventions(
    model: HookedTransformer,
    clt: CrossLayerTranscoder,
    tokens: torch.Tensor,
    interventions: list[Intervention],
    freeze_attention: bool = True,
    state: dict | None = None,
) -> torch.Tensor:
    """Logits [P, d_vocab] of the spliced model on tokens [P] with the features set or scaled."""
    state = state or clean_state(model, clt, tokens)
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)

    def edit(l, a):
        for iv in by_layer.get(l, []):
            a = a.clone()
            a[0, iv.pos, iv.feature] = iv.value if iv.value is not None else a[0, iv.pos, iv.feature] * iv.scale
        return a

    hooks = splice_hooks(model, clt, state, edit, freeze_attention)
    return model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]


@dataclass
class ValidationReport:
    nodes: list[str]
    predicted: list[float]  # graph's predicted change of the first target's (demeaned) logit
    actual_frozen: list[float]  # ablation in the spliced model, attention frozen
    actual_free: list[float]  # ablation with attention recomputed
    corr_frozen: float
    corr_free: float

    def lines(self) -> list[str]:
        out = [f"{'node':>16} {'predicted':>10} {'frozen':>10} {'free':>10}"]
        for row in zip(self.nodes, self.predicted, self.actual_frozen, self.actual_free, strict=True):
            out.append(f"{row[0]:>16} {row[1]:>10.4f} {row[2]:>10.4f} {row[3]:>10.4f}")
        out.append(
            f"correlation (attention frozen): {self.corr_frozen:.3f}; (attention recomputed): {self.corr_free:.3f}"
        )
        return out


def predicted_ablation_effects(graph) -> torch.Tensor:
    """The graph's prediction of how ablating each feature changes each target's input: [T, n].
    Active JumpReLU features pass changes of their input through unchanged, so ablating s moves
    node inputs by -(I - M)^-1 A[:, s], with M the adjacency whose feature columns are divided by
    the feature's activation (edges are a_s times a derivative). Features read only from lower
    layers, so M's feature block M_ff is strictly lower triangular in node order, and the targets'
    rows are A_T + y A_f with y (I - M_ff) = M_Tf: one triangular solve with T right-hand sides."""
    n, T = graph.n_features, graph.n_targets
    A = graph.dense_adjacency().double()
    per_unit = A[:, :n] / graph.activations.double()  # [N, n]: M's feature columns
    # (I - M_ff)^T y^T = M_Tf^T; unitriangular: the solve takes the diagonal as 1 and reads -M_ff above it
    y = torch.linalg.solve_triangular(-per_unit[:n].T, per_unit[-T:].T, upper=True, unitriangular=True).T
    return -(A[-T:, :n] + y @ A[:n, :n]).float()


def validate(graph, model: HookedTransformer, clt: CrossLayerTranscoder, top_k: int = 10) -> ValidationReport:
    """Ablate the graph's top-k features (by influence) one at a time; compare the change of the
    first target's logit (demeaned) with the graph's prediction."""
    tokens = graph.tokens.to(model.cfg.device)
    state = clean_state(model, clt, tokens)
    influence = graph.influence()[: graph.n_features]
    top = influence.topk(min(top_k, graph.n_features)).indices.tolist()
    predicted = predicted_ablation_effects(graph)[0]
    clean_logits = run_with_interventions(model, clt, tokens, [], state=state)
    # the first target's logit weights (demeaned one-hot, or e_a - e_b for a logit difference)
    names = graph.config["attribution"]["targets"]
    weights = resolve_targets(model, clean_logits[-1], names)[0].weights

    def target_logit(logits: torch.Tensor) -> float:
        return (logits[-1] @ weights).item()

    base = target_logit(clean_logits)
    rows = []
    for i in top:
        layer, pos, feat = graph.features[i].tolist()
        ablate = [Intervention(layer, pos, feat, value=0.0)]
        frozen = target_logit(run_with_interventions(model, clt, tokens, ablate, True, state)) - base
        free = target_logit(run_with_interventions(model, clt, tokens, ablate, False, state)) - base
        rows.append((f"{layer}_{feat}_{pos}", predicted[i].item(), frozen, free))
    names, pred, fro, fre = (list(c) for c in zip(*rows, strict=True))
    return ValidationReport(names, pred, fro, fre, _corr(pred, fro), _corr(pred, fre))


def _corr(a: list[float], b: list[float]) -> float:
    return torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1].item()
