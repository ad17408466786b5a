"""Two or more models on the same prompts: how each one "thinks", read from its own residual stream.

Each model gets its own trajectories (its own PCA space, so models of different width compare), its own
funnel (its prompts grouped by its own answers) and per-prompt thinking-style metrics from the logit lens
at the last position:

- decision depth: the first row (0 = embeddings, L = the output) from which the model's final answer stays
  the top token through every later row; also as a fraction of the depth L, so models of different depth
  compare;
- ambiguity: the entropy (nats) of the lens distribution at each row;
- commitment speed: the largest rise of the answer's lens probability over one block.

With a split answer (e.g. the refusal `I` of a model tuned to refuse), the prompts that any model answers
with it are followed against the rest in every model: per row the distance between the two groups'
centroids over the sum of their RMS radii (> 1: the groups no longer overlap), and the row from which
they stay apart: where a refusal parts from answering, and how far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuits.concepts.lens import logit_lens
from circuits.concepts.trajectories import Trajectories, funnel, spread, trajectories
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens


@dataclass
class ThinkingStyle:
    """One prompt's logit-lens reading at its last position, rows 0..L."""

    prompt: str
    answer: str  # the model's top next token
    decision_depth: int  # first row from which the answer stays rank 1
    ambiguity: list[float]  # [L+1] entropy of the lens distribution, nats
    answer_prob: list[float]  # [L+1] the answer's lens probability
    commitment_speed: float  # largest one-block rise of answer_prob


@dataclass
class ModelView:
    """One model's trajectories, funnel and thinking styles on the compared prompts."""

    name: str
    n_layers: int
    d_model: int
    trajectories: Trajectories  # the prompts in this model's own PCA space
    funnel: dict[str, torch.Tensor] | None  # None when no two prompts share an answer
    styles: list[ThinkingStyle]
    split: dict[str, torch.Tensor | int | None] | None = None  # see `parting`

    def summary(self) -> dict[str, float]:
        """Means over the prompts: decision depth (rows, and as a fraction of the depth), commitment speed,
        ambiguity at the embeddings and at the output."""
        n, L = len(self.styles), self.n_layers
        return {
            "decision_depth": sum(s.decision_depth for s in self.styles) / n,
            "decision_depth_fraction": sum(s.decision_depth for s in self.styles) / n / L,
            "commitment_speed": sum(s.commitment_speed for s in self.styles) / n,
            "ambiguity_first": sum(s.ambiguity[0] for s in self.styles) / n,
            "ambiguity_last": sum(s.ambiguity[-1] for s in self.styles) / n,
        }


@torch.no_grad()
def thinking_style(model: HookedTransformer, prompt: str) -> ThinkingStyle:
    """The logit-lens metrics of one prompt (see the module docstring)."""
    lens, _ = logit_lens(model, prompt_tokens(model, prompt))
    last = lens[:, -1].float()  # [L+1, vocab]
    logprobs = last.log_softmax(-1)
    answer = int(last[-1].argmax())
    on_top = (last.argmax(-1) == answer).tolist()  # [L+1]
    depth = len(on_top)
    while depth > 0 and on_top[depth - 1]:
        depth -= 1
    prob = logprobs[:, answer].exp()  # [L+1]
    return ThinkingStyle(
        prompt=prompt,
        answer=model.to_single_str_token(answer),
        decision_depth=depth,
        ambiguity=(-(logprobs.exp() * logprobs).sum(-1)).tolist(),
        answer_prob=prob.tolist(),
        commitment_speed=float((prob[1:] - prob[:-1]).max()),
    )


def parting(states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | int | None]:
    """How the prompts in `mask` [n] part from the others, per row of `states` [n, L+1, d]: `distance` between
    the two centroids, `separation` = distance / (sum of the two groups' RMS radii), and `row`, the first row
    from which the separation stays above 1 (None if it never does)."""
    if mask.all() or not mask.any():
        raise CircuitsError("the split needs prompts on both sides: some with the split answer, some without")
    a, b = states[mask], states[~mask]
    distance = (a.mean(0) - b.mean(0)).norm(dim=-1)  # [L+1]
    radii = spread(a).sqrt() + spread(b).sqrt()
    separation = distance / radii.clamp_min(torch.finfo(radii.dtype).tiny)
    apart = (separation > 1).tolist()
    row = len(apart)
    while row > 0 and apart[row - 1]:
        row -= 1
    return {"distance": distance, "separation": separation, "row": row if row < len(apart) else None}


def view_model(name: str, model: HookedTransformer, prompts: list[str], k: int = 3) -> ModelView:
    """One model's view of the prompts: trajectories in `k` components of its own PCA, funnel, styles."""
    styles = [thinking_style(model, p) for p in prompts]
    answers = [s.answer for s in styles]
    followed = trajectories(model, {"prompts": prompts}, answers={"prompts": answers}, k=k)
    shared = len(set(answers)) < len(answers)
    return ModelView(
        name=name,
        n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
        trajectories=followed,
        funnel=funnel(followed.states["prompts"], answers) if shared else None,
        styles=styles,
    )


def compare_models(
    models: dict[str, HookedTransformer], prompts: list[str], k: int = 3, split_answer: str | None = None
) -> list[ModelView]:
    """Each model's view of the same prompts, in the order given; with `split_answer`, each view's `split`
    follows the prompts that any model answers with it against the rest (see `parting`)."""
    if len(models) < 2:
        raise CircuitsError("compare needs at least two models: pass --model twice")
    if len(prompts) < 2:
        raise CircuitsError("compare needs at least two prompts: pass more, or one with variants to propose")
    views = [view_model(name, model, prompts, k) for name, model in models.items()]
    if split_answer is not None:
        mask = torch.tensor(
            [any(v.styles[i].answer.strip() == split_answer for v in views) for i in range(len(prompts))]
        )
        for v in views:
            v.split = parting(v.trajectories.states["prompts"], mask)
    return views
