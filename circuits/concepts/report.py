"""The concept report of one prompt: every concept-trace analysis, and its figures.

`concept_report` resolves the concept specs, traces them, scores the paths, patches against a
counterfactual and follows the prompt's same-category variants through the layers; `figures` turns
a report into chart specs (`circuits.concepts.figures`; the trace page embeds these,
`circuits.concepts.page` writes a page of its own). Categories and counterfactuals are inputs: with
no categories, none are proposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformer

from circuits.concepts import figures as cf
from circuits.concepts.categories import Categories
from circuits.concepts.cells import graph_nodes_by_cell
from circuits.concepts.lens import (
    Concept,
    ConceptTrace,
    logit_lens,
    make_concept,
    propose_intermediates,
    trace_concept,
    whole_words,
)
from circuits.concepts.patching import PatchingResult, patching_grid
from circuits.concepts.paths import PathScore, rank_paths
from circuits.concepts.trajectories import Trajectories, funnel, trajectories
from circuits.concepts.variants import answer_groups, category_variants, propose_counterfactuals, slot_swaps
from circuits.errors import CircuitsError
from circuits.models import prompt_tokens

MAX_TRAJECTORY_PROMPTS = 24


@dataclass
class ConceptReport:
    """Every concept-trace analysis of one prompt."""

    prompt: str
    tokens: list[str]
    n_layers: int
    prediction: str  # the model's top next token
    traces: list[ConceptTrace]
    paths: list[PathScore]  # best first
    proposals: list[str]  # auto-proposed intermediate concepts, best first
    patching: PatchingResult | None = None
    trajectories: Trajectories | None = None
    funnel: dict[str, torch.Tensor] | None = None
    graph_cells: dict[tuple[int, int], list[str]] = field(default_factory=dict)  # trace cell -> graph node ids
    notes: list[str] = field(default_factory=list)  # warnings for the reader (e.g. words scored whole)

    def trace(self, name: str) -> ConceptTrace:
        return next(t for t in self.traces if t.concept.name == name)


def concept_report(
    model: HookedTransformer,
    prompt: str,
    concepts: list | None = None,
    paths: list[list[str]] | None = None,
    counterfactual: str | None = None,
    auto: bool = False,
    full_sequence: bool = False,
    graph_nodes: list[dict] | None = None,
    trajectory_sets: dict[str, list[str]] | None = None,
    categories: Categories | None = None,
    three_d: bool = False,
) -> ConceptReport:
    """Trace the concepts (specs as in `make_concept`, `@name` from `categories`; every element of a path
    is traced too), score the paths (with a counterfactual, causally too), patch against the counterfactual
    (default: a same-category variant, or else the model's own slot swap of a traced prompt word, that
    changes the answer) and follow the prompt and its variants grouped by answer (plus any
    `trajectory_sets`, e.g. one-hop prompts to overlay) through the layers, in 3 principal components
    with `three_d` (a rotatable 3D figure), else 2.

    With `auto`, or with no concepts and no paths, the best middle-layer proposal and the model's
    prediction are traced and the path proposal -> prediction is scored."""
    categories = categories or {}
    if counterfactual is not None and not counterfactual.strip():
        raise CircuitsError("--counterfactual is empty: pass a prompt of the same token length, or leave it out")
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    prediction = model.to_single_str_token(int(lens[-1, -1].argmax())).strip()
    proposals = propose_intermediates(model, tokens, lens)
    specs, paths = list(concepts or []), [list(p) for p in paths or []]
    if (auto or not (specs or paths)) and proposals:
        specs += [(proposals[0], [proposals[0]]), (prediction, [prediction])]  # words as they are, even with "="
        paths.append([proposals[0], prediction])
    made, paths = resolve_concepts(model, specs, paths, categories)
    whole, notes = whole_words(list(made.values()), model, full_sequence)
    traces = [trace_concept(model, tokens, lens, cache, c, whole) for c in made.values()]
    anchors = [t.anchor_position for t in traces if t.anchor_position is not None]
    patching = patch_against(model, prompt, counterfactual, categories, anchors)
    followed, same_answer = follow_variants(
        model, prompt, trajectory_sets or {}, categories, anchors, 3 if three_d else 2
    )
    return ConceptReport(
        prompt=prompt,
        tokens=model.to_str_tokens(tokens),
        n_layers=model.cfg.n_layers,
        prediction=prediction,
        traces=traces,
        paths=rank_paths({t.concept.name: t for t in traces}, paths, model.cfg.n_layers, patching),
        proposals=proposals,
        patching=patching,
        trajectories=followed,
        funnel=same_answer,
        graph_cells=graph_nodes_by_cell(graph_nodes or [], model.cfg.n_layers),
        notes=notes,
    )


def resolve_concepts(
    model: HookedTransformer, specs: list, paths: list[list[str]], categories: Categories
) -> tuple[dict[str, Concept], list[list[str]]]:
    """The concepts to trace by name (the first spec of each name wins; path elements not yet made are
    added) and each path as concept names. A path element is a made concept's name or a spec."""
    short = [path for path in paths if len(path) < 2]
    if short:
        chain = ",".join(short[0])
        raise CircuitsError(f"--path {chain!r} is not a chain: pass two or more concepts, e.g. Dallas,Texas,Austin")
    made: dict[str, Concept] = {}
    for spec in specs:
        concept = make_concept(model, spec, categories)
        made.setdefault(concept.name, concept)
    return made, [[_path_concept(model, made, spec, categories) for spec in path] for path in paths]


def _path_concept(model: HookedTransformer, made: dict[str, Concept], spec: str, categories: Categories) -> str:
    """The name of a path element: a concept already made (by name), or a new one made from the spec."""
    if spec in made:
        return spec
    concept = make_concept(model, spec, categories)
    made.setdefault(concept.name, concept)
    return concept.name


def patch_against(
    model: HookedTransformer, prompt: str, counterfactual: str | None, categories: Categories, anchors: list[int]
) -> PatchingResult | None:
    """The patching grid of the prompt against `counterfactual`, or else against the first proposed variant
    (see `propose_counterfactuals`; slot swaps at the `anchors`, the traced words of the prompt, when there
    are any) whose answer differs; None when there is neither."""
    counterfactuals = (
        [counterfactual] if counterfactual else propose_counterfactuals(model, prompt, categories, 1, anchors or None)
    )
    return patching_grid(model, prompt, counterfactuals[0]) if counterfactuals else None


def follow_variants(
    model: HookedTransformer,
    prompt: str,
    extra_sets: dict[str, list[str]],
    categories: Categories,
    anchors: list[int],
    k: int = 2,
) -> tuple[Trajectories | None, dict[str, torch.Tensor] | None]:
    """Trajectories of the prompt and its variants (same-category swaps, or else the model's own slot swaps
    at the `anchors`; at most MAX_TRAJECTORY_PROMPTS, grouped by answer, see `answer_groups`), plus
    `extra_sets`, in `k` principal components, and their funnel when some prompts share an answer; None for
    a lone prompt."""
    variants = category_variants(model, prompt, categories) or slot_swaps(model, prompt, anchors or None)
    sets = {"prompt and variants": answer_groups(model, prompt, variants, MAX_TRAJECTORY_PROMPTS), **extra_sets}
    if sum(len(s) for s in sets.values()) <= 1:
        return None, None
    followed = trajectories(model, sets, k=k)
    answers = [a for name in sets for a in followed.answers[name]]
    if len(set(answers)) == len(answers):
        return followed, None
    return followed, funnel(torch.cat(list(followed.states.values())), answers)


def figures(report: ConceptReport) -> dict[str, dict]:
    """Every chart spec of the report, keyed by a stable name ("trace:Texas", "patching:head", "flow",
    ...), in reading order: the concepts by `panel_order` (the intermediate first), then the path, the
    patching grids and the trajectories."""
    tokens = report.tokens
    out: dict[str, dict] = {}
    for t in panel_order(report):
        out[f"trace:{t.concept.name}"] = cf.trace_figure(t, tokens)
        out[f"writers:{t.concept.name}"] = cf.writers_figure(t, tokens)
    if report.paths:
        out["flow"] = cf.flow_figure(flow_steps(report), tokens, report.n_layers)
        out["paths"] = cf.paths_figure(report.paths)
    if report.patching:
        for kind in report.patching.grids:
            out[f"patching:{kind}"] = cf.patching_figure(report.patching, kind, tokens)
    if report.trajectories:
        out["trajectories"] = cf.trajectories_figure(report.trajectories, report.n_layers + 1)
    if report.funnel:
        out["funnel"] = cf.funnel_figure(report.funnel)
    return out


def panel_order(report: ConceptReport) -> list[ConceptTrace]:
    """The traces in the order a reader wants them: the best path's intermediate concepts first, then
    the other concepts the prompt does not contain (the answer), then the prompt's own words (their
    traces are anchored at their tokens and say little)."""
    middle = set(report.paths[0].path[1:-1]) if report.paths else set()

    def role(t: ConceptTrace) -> int:
        if t.anchor_position is not None:
            return 2
        return 0 if t.concept.name in middle else 1

    return sorted(report.traces, key=role)


def flow_steps(report: ConceptReport) -> list[dict]:
    """The best path's bubbles in order."""
    return cf.flow_steps(report.paths[0], {t.concept.name: t for t in report.traces})
