"""Concept traces on the demo world's two-hop prompts, where the ground truth is known.

For "Fact : Dallas is in the state whose capital is", the true path is Dallas -> Texas -> Austin;
every other state S gives a wrong path Dallas -> S -> capital(S). We ask where the intermediate
state peaks and whether the true path outscores the wrong ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.concepts.lens import logit_lens, make_concept, trace_concept
from circuits.concepts.patching import patching_grid
from circuits.concepts.paths import score_path
from circuits.concepts.variants import propose_counterfactuals
from circuits.demo.corpus import TWO_HOP_PROMPT
from circuits.demo.facts import CATEGORIES, STATE_OF_CITY, STATES, held_out_cities, trained_two_hop_cities
from circuits.models import prompt_tokens


@dataclass
class TwoHopResult:
    prompt: str
    kind: str
    city: str
    state: str
    state_peak: tuple[int, int]  # (layer, position) of the true state's highest logit-lens probability
    state_peak_prob: float
    state_peak_rank: int
    state_rank_last_position: list[int]  # per layer row, the true state's rank among all states at the last token
    true_score: float
    wrong_score: float  # the path through one other state, drawn by seed
    true_baseline: float
    wrong_baseline: float
    true_rank_among_paths: int  # 1 = the true path outscores all paths through other states


def two_hop_cases() -> list[tuple[str, str]]:
    """(city, kind) of every two-hop evaluation prompt: kind "two_hop" (trained) or "two_hop_held_out"."""
    return [(c, "two_hop") for c in trained_two_hop_cities()] + [(c, "two_hop_held_out") for c in held_out_cities()]


def study_prompt(model: HookedTransformer, city: str, kind: str, rng: random.Random) -> TwoHopResult:
    """Traces and path scores of one two-hop prompt against every other state's path."""
    prompt = TWO_HOP_PROMPT.format(city=city)
    state = STATE_OF_CITY[city]
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    names = [city, *(s.name for s in STATES), *(s.capital for s in STATES)]
    traces = {n: trace_concept(model, tokens, lens, cache, make_concept(model, n)) for n in names}
    scores = {s.name: score_path(traces, [city, s.name, s.capital], model.cfg.n_layers) for s in STATES}
    wrong = rng.choice([s.name for s in STATES if s.name != state.name])
    state_ids = [make_concept(model, s.name).first_tokens[0] for s in STATES]
    last = lens[:, -1, state_ids]  # [L+1, states]
    own = (last > last[:, [STATES.index(state)]]).sum(-1) + 1  # [L+1]
    peak_prob, peak_rank = traces[state.name].peak_prob_rank()
    true = scores[state.name]
    return TwoHopResult(
        prompt=prompt,
        kind=kind,
        city=city,
        state=state.name,
        state_peak=traces[state.name].peak(),
        state_peak_prob=peak_prob,
        state_peak_rank=peak_rank,
        state_rank_last_position=own.tolist(),
        true_score=true.score,
        wrong_score=scores[wrong].score,
        true_baseline=true.baseline,
        wrong_baseline=scores[wrong].baseline,
        true_rank_among_paths=1 + sum(s.score > true.score for s in scores.values()),
    )


def patching_at_state_peak(model: HookedTransformer, result: TwoHopResult) -> tuple[float, float]:
    """Is the state's peak cell causal for the answer? Recovered logit difference when the clean residual
    stream (resid_pre, at the peak's layer, capped at the last block) is patched into a run on another
    state's city, at the peak's position and at the last position."""
    counterfactual = propose_counterfactuals(model, result.prompt, CATEGORIES, n=1)[0]
    grid = patching_grid(model, result.prompt, counterfactual, kinds=("resid_pre",)).grids["resid_pre"]  # [L, pos]
    layer = min(result.state_peak[0], model.cfg.n_layers - 1)
    return float(grid[layer, result.state_peak[1]]), float(grid[layer, -1])


def study(model: HookedTransformer, cases: list[tuple[str, str]], seed: int = 0) -> list[TwoHopResult]:
    """One result per (city, kind); the wrong state of each prompt is drawn from `seed`."""
    rng = random.Random(seed)
    return [study_prompt(model, city, kind, rng) for city, kind in tqdm(cases, desc="two-hop prompts", leave=False)]
