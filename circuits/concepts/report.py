"""The concept report of one prompt: every analysis, its figures, and a self-contained offline HTML page.

`concept_report` runs the analyses; `figures` turns a report into plotly figures (the main page
embeds these); `write_concepts_page` writes concepts.html (plotly.js inlined, no network request),
concepts.json (the numbers) and flow.gif.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import torch
from transformer_lens import HookedTransformer

from circuits.concepts import figures as cf
from circuits.concepts.lens import (
    Concept,
    ConceptTrace,
    PathScore,
    graph_nodes_by_cell,
    logit_lens,
    make_concept,
    prompt_tokens,
    propose_intermediates,
    rank_paths,
    trace_concept,
)
from circuits.concepts.patching import PatchingResult, category_variants, patching_grid, propose_counterfactuals
from circuits.concepts.trajectories import Trajectories, funnel, trajectories
from circuits.fileio import atomic_file

log = logging.getLogger(__name__)
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

    def trace(self, name: str) -> ConceptTrace:
        return next(t for t in self.traces if t.concept.name == name)

    def to_json_dict(self) -> dict:
        """Plain JSON types only: lists of floats, ints and strings."""
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "n_layers": self.n_layers,
            "rows": "row r = residual stream after r blocks (0 = embeddings)",
            "prediction": self.prediction,
            "proposals": self.proposals,
            "concepts": [_trace_json(t) for t in self.traces],
            "paths": [_path_json(p) for p in self.paths],
            "patching": _patching_json(self.patching) if self.patching else None,
            "trajectories": _trajectories_json(self.trajectories) if self.trajectories else None,
            "funnel": {k: _floats(v) for k, v in self.funnel.items()} if self.funnel else None,
            "graph_cells": {f"{r},{p}": ids for (r, p), ids in sorted(self.graph_cells.items())},
        }


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
) -> ConceptReport:
    """Trace the concepts (specs as in `make_concept`; every word of a path is traced too), score the
    paths, patch against the counterfactual (proposed from the same category when not given) and
    follow the prompt and its same-category variants (plus any `trajectory_sets`, e.g. one-hop prompts to
    overlay) through the layers.

    With `auto`, or with no concepts and no paths, the best middle-layer proposal and the model's
    prediction are traced and the path proposal -> prediction is scored."""
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    prediction = model.to_single_str_token(int(lens[-1, -1].argmax())).strip()
    proposals = propose_intermediates(model, tokens, lens)
    specs, paths = list(concepts or []), [list(p) for p in paths or []]
    if (auto or not (specs or paths)) and proposals:
        specs += [proposals[0], prediction]
        paths.append([proposals[0], prediction])
    made: dict[str, Concept] = {}
    for spec in specs:
        concept = make_concept(model, spec)
        made.setdefault(concept.name, concept)
    paths = [[_path_concept(model, made, spec) for spec in path] for path in paths]
    traces = [trace_concept(model, tokens, lens, cache, c, full_sequence) for c in made.values()]
    by_name = {t.concept.name: t for t in traces}
    report = ConceptReport(
        prompt=prompt,
        tokens=model.to_str_tokens(tokens),
        n_layers=model.cfg.n_layers,
        prediction=prediction,
        traces=traces,
        paths=rank_paths(by_name, paths, model.cfg.n_layers),
        proposals=proposals,
        graph_cells=graph_nodes_by_cell(graph_nodes or [], model.cfg.n_layers),
    )
    counterfactuals = [counterfactual] if counterfactual else propose_counterfactuals(model, prompt, n=1)
    if counterfactuals:
        report.patching = patching_grid(model, prompt, counterfactuals[0])
    sets = {"prompt and variants": [prompt, *category_variants(model, prompt)[: MAX_TRAJECTORY_PROMPTS - 1]]}
    sets.update(trajectory_sets or {})
    if sum(len(s) for s in sets.values()) > 1:
        report.trajectories = trajectories(model, sets)
        answers = [a for name in sets for a in report.trajectories.answers[name]]
        if len(set(answers)) < len(answers):
            report.funnel = funnel(torch.cat(list(report.trajectories.states.values())), answers)
    return report


def _path_concept(model: HookedTransformer, made: dict[str, Concept], spec: str) -> str:
    """The name of a path element: a concept already made (by name), or a new one made from the spec."""
    if spec in made:
        return spec
    concept = make_concept(model, spec)
    made.setdefault(concept.name, concept)
    return concept.name


def figures(report: ConceptReport) -> dict[str, go.Figure]:
    """Every figure of the report, keyed by a stable name ("trace:Texas", "patching:head", "flow", ...)."""
    tokens = report.tokens
    out: dict[str, go.Figure] = {}
    for t in report.traces:
        out[f"trace:{t.concept.name}"] = cf.trace_figure(t, tokens, report.graph_cells)
        out[f"writers:{t.concept.name}"] = cf.writers_figure(t, tokens)
    if report.paths:
        out["paths"] = cf.paths_figure(report.paths)
        out["flow"] = cf.flow_figure(flow_steps(report), tokens, report.n_layers)
    if report.patching:
        for kind in report.patching.grids:
            out[f"patching:{kind}"] = cf.patching_figure(report.patching, kind, tokens)
    if report.trajectories:
        out["trajectories"] = cf.trajectories_figure(report.trajectories)
    if report.funnel:
        out["funnel"] = cf.funnel_figure(report.funnel)
    return out


def flow_steps(report: ConceptReport) -> list[dict]:
    """The best path's bubbles in order."""
    return cf.flow_steps(report.paths[0], {t.concept.name: t for t in report.traces})


def render_concepts_html(report: ConceptReport) -> str:
    """One self-contained page: plotly.js inlined, every text escaped, no external resource."""
    figs = figures(report)
    specs = [{"id": f"fig{i}", "figure": json.loads(fig.to_json())} for i, fig in enumerate(figs.values())]
    sections = "\n".join(
        f'<section><h2>{html.escape(name)}</h2><div id="fig{i}" class="fig"></div></section>'
        for i, name in enumerate(figs)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>concept traces: {html.escape(report.prompt)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} code{{background:#f4f4f4}}</style>
<script>{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>Concept traces</h1>
<p>Prompt: <code>{html.escape(report.prompt)}</code> → prediction <b>{html.escape(report.prediction)}</b></p>
<p>Tokens: {" ".join(f"<code>{html.escape(t)}</code>" for t in report.tokens)}</p>
<p>Auto-proposed intermediate concepts: {html.escape(", ".join(report.proposals) or "none")}</p>
{_paths_table(report.paths)}
{_patching_line(report.patching)}
{sections}
<script>
const FIGURES = {_script_json(specs)};
for (const f of FIGURES) {{
  Plotly.newPlot(f.id, {{data: f.figure.data, layout: f.figure.layout, frames: f.figure.frames || [],
                        config: {{displaylogo: false, responsive: true}}}});
}}
</script>
</body></html>
"""


def write_concepts_page(report: ConceptReport, out_dir: Path) -> Path:
    """Write concepts.html, concepts.json and (when a path was scored) flow.gif; return the page's path."""
    out_dir = Path(out_dir)
    with atomic_file(out_dir / "concepts.json") as f:
        json.dump(report.to_json_dict(), f, indent=1)
    if report.paths:
        with atomic_file(out_dir / "flow.gif", "wb") as f:
            f.write(cf.flow_gif(flow_steps(report), report.tokens, report.n_layers))
    page = out_dir / "concepts.html"
    with atomic_file(page) as f:
        f.write(render_concepts_html(report))
    log.info("wrote %s", page)
    return page


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' survive literally."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _paths_table(paths: list[PathScore]) -> str:
    if not paths:
        return "<p>No paths scored.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(' → '.join(p.path))}</td><td>{p.score:.3f}</td><td>{p.baseline:.3f}</td>"
        f"<td>{html.escape(str(p.peaks))}</td><td>{p.ordered_by_position}</td><td>{p.ordered_by_layer}</td>"
        f"<td>{p.completeness:.2f}</td></tr>"
        for p in paths
    )
    head = "<tr><th>path</th><th>score</th><th>baseline</th><th>peaks (layer, pos)</th>"
    return f"<table>{head}<th>pos order</th><th>layer order</th><th>complete</th></tr>{rows}</table>"


def _patching_line(result: PatchingResult | None) -> str:
    if result is None:
        return "<p>No counterfactual: patching skipped.</p>"
    return (
        f"<p>Patching: clean <code>{html.escape(result.clean_prompt)}</code> vs counterfactual "
        f"<code>{html.escape(result.corrupt_prompt)}</code>; metric = recovered fraction of "
        f"logit({html.escape(result.answer)}) − logit({html.escape(result.foil)}).</p>"
    )


def _floats(t: torch.Tensor) -> list:
    return torch.round(t.float(), decimals=6).tolist()


def _trace_json(t: ConceptTrace) -> dict:
    layer, pos = t.peak()
    return {
        "name": t.concept.name,
        "words": list(t.concept.words),
        "token_ids": [list(ids) for ids in t.concept.token_ids],
        "peak": {"layer": layer, "position": pos, "anchored_in_prompt": t.anchor_position is not None},
        "prob": _floats(t.prob),
        "logprob": _floats(t.logprob),
        "rank": t.rank.tolist(),
        "logit": _floats(t.logit),
        "attn_direct": _floats(t.attn_direct),
        "mlp_direct": _floats(t.mlp_direct),
        "sequence_logprob": _floats(t.sequence_logprob) if t.sequence_logprob is not None else None,
    }


def _path_json(p: PathScore) -> dict:
    return {
        "path": list(p.path),
        "peaks": [list(x) for x in p.peaks],
        "peak_probs": p.peak_probs,
        "peak_ranks": p.peak_ranks,
        "ordered_by_position": p.ordered_by_position,
        "ordered_by_layer": p.ordered_by_layer,
        "completeness": p.completeness,
        "strength": p.strength,
        "baseline": p.baseline,
        "order_factor": p.order_factor,
        "score": p.score,
    }


def _patching_json(r: PatchingResult) -> dict:
    return {
        "clean_prompt": r.clean_prompt,
        "corrupt_prompt": r.corrupt_prompt,
        "answer": r.answer,
        "foil": r.foil,
        "clean_diff": r.clean_diff,
        "corrupt_diff": r.corrupt_diff,
        "grids": {k: _floats(v) for k, v in r.grids.items()},
    }


def _trajectories_json(t: Trajectories) -> dict:
    return {
        "sets": t.sets,
        "answers": t.answers,
        "coords": {k: _floats(v) for k, v in t.coords.items()},
        "explained_variance": _floats(t.pca.explained),
    }
