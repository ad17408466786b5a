"""Hidden-state trajectories: the residual stream of many prompts, layer by layer, in a shared PCA plane.

The "funnel" asks how fast prompts with the same answer converge and different answers part: at each
layer, the spread within each answer's prompts against the spread between the answers' centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.models import prompt_tokens


@torch.no_grad()
def residual_states(model: HookedTransformer, prompts: list[str], position: int = -1) -> torch.Tensor:
    """The residual stream after 0..L blocks at `position` of each prompt (-1 = its last token):
    [n_prompts, L+1, d_model]. Prompts of equal token length share a forward pass."""
    if not prompts:
        raise CircuitsError("no prompts: pass at least one")
    tokens = [prompt_tokens(model, p) for p in prompts]
    out = torch.zeros(len(prompts), model.cfg.n_layers + 1, model.cfg.d_model)
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        if not -t.shape[1] <= position < t.shape[1]:
            raise CircuitsError(f"position {position} is outside prompt {prompts[i]!r} ({t.shape[1]} tokens)")
        by_length.setdefault(t.shape[1], []).append(i)
    names = {f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)}
    names.add(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    for rows in by_length.values():
        _, cache = model.run_with_cache(torch.cat([tokens[i] for i in rows]), names_filter=lambda n: n in names)
        out[rows] = cache.accumulated_resid()[:, :, position].transpose(0, 1).cpu()  # [L+1, n, d] -> [n, L+1, d]
    return out


@dataclass
class PCA:
    mean: torch.Tensor  # [d]
    components: torch.Tensor  # [k, d], unit rows
    explained: torch.Tensor  # [k] fraction of the pooled variance

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., k]"""
        return (x - self.mean) @ self.components.T


def fit_pca(x: torch.Tensor, k: int = 2) -> PCA:
    """PCA by SVD of the centred rows of x [n, d]; each component's sign makes its largest entry positive."""
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(k, vh.shape[0])
    signs = vh[:k].gather(1, vh[:k].abs().argmax(1, keepdim=True)).sign()
    variance = s**2
    return PCA(mean, vh[:k] * signs, variance[:k] / variance.sum())


@dataclass
class Trajectories:
    """Prompt sets projected into one PCA space fitted on every state of every set pooled."""

    sets: dict[str, list[str]]  # set name -> prompts
    answers: dict[str, list[str]]  # set name -> each prompt's answer label
    states: dict[str, torch.Tensor]  # set name -> [n, L+1, d_model]
    coords: dict[str, torch.Tensor]  # set name -> [n, L+1, k]
    pca: PCA


def trajectories(
    model: HookedTransformer,
    sets: dict[str, list[str]],
    answers: dict[str, list[str]] | None = None,
    k: int = 2,
    position: int = -1,
    other_model: HookedTransformer | None = None,
) -> Trajectories:
    """Trajectories of one or more prompt sets (e.g. two-hop vs one-hop). With `other_model`, the second
    set is read from it instead (two models compared in one space; they need the same d_model).
    `answers` defaults to each prompt's top prediction."""
    models = {name: model if i == 0 or other_model is None else other_model for i, name in enumerate(sets)}
    if len({m.cfg.d_model for m in models.values()}) > 1:
        raise CircuitsError("the two models have different d_model: their states cannot share one PCA space")
    states = {name: residual_states(models[name], prompts, position) for name, prompts in sets.items()}
    if answers is None:
        answers = {name: top_predictions(models[name], prompts) for name, prompts in sets.items()}
    pca = fit_pca(torch.cat([s.flatten(0, 1) for s in states.values()]), k)
    coords = {name: pca.project(s) for name, s in states.items()}
    return Trajectories(sets=dict(sets), answers=dict(answers), states=states, coords=coords, pca=pca)


@torch.no_grad()
def top_predictions(model: HookedTransformer, prompts: list[str]) -> list[str]:
    return [model.to_single_str_token(int(model(prompt_tokens(model, p))[0, -1].argmax())) for p in prompts]


def funnel(states: torch.Tensor, answers: list[str]) -> dict[str, torch.Tensor]:
    """Per layer [L+1], over the prompts whose answer is shared by >= 2 prompts (the others have no partner):
    `within`, the mean squared distance of each prompt to its answer's centroid; `between`, of each prompt's
    answer centroid to the centroid of all (within + between = `total`, their spread); `ratio` = within /
    total, falling as prompts with the same answer converge and different answers part; 0 where all
    prompts coincide (the last token's embedding is often the same word for every prompt)."""
    groups = [[i for i, a in enumerate(answers) if a == answer] for answer in sorted(set(answers))]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        raise CircuitsError("the funnel needs at least two prompts with the same answer")
    kept = states[[i for g in groups for i in g]]  # [n, L+1, d]
    sizes = torch.tensor([len(g) for g in groups], dtype=states.dtype)[:, None] / len(kept)  # [groups, 1]
    within = (torch.stack([spread(states[g]) for g in groups]) * sizes).sum(0)
    centroids = torch.stack([states[g].mean(0) for g in groups])  # [groups, L+1, d]
    between = ((centroids - kept.mean(0)).pow(2).sum(-1) * sizes).sum(0)
    total = spread(kept)
    # Identical states (every prompt ends in the same word) leave only rounding noise in `total`.
    coincide = total <= 1e-8 * kept.pow(2).sum(-1).mean(0)
    ratio = torch.where(coincide, 0.0, within / total.clamp_min(torch.finfo(total.dtype).tiny))
    return {"within": within, "between": between, "total": total, "ratio": ratio}


def spread(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to the centroid of x [n, L+1, d], per layer: [L+1]."""
    return (x - x.mean(0)).pow(2).sum(-1).mean(0)
