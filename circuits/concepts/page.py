"""The standalone concept page of one report: concepts.html (the charts' script inlined, every text
escaped, no network request), concepts.json (every number, plain JSON types) and flow.gif (the
reasoning flow)."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from circuits.concepts.figures import flow_gif
from circuits.concepts.report import ConceptReport, figures, flow_steps
from circuits.fileio import atomic_file, write_json

if TYPE_CHECKING:
    from circuits.concepts.lens import ConceptTrace
    from circuits.concepts.patching import PatchingResult
    from circuits.concepts.paths import PathScore
    from circuits.concepts.trajectories import Trajectories

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent


def report_json(report: ConceptReport) -> dict:
    """The report's numbers in plain JSON types only: lists of floats, ints and strings."""
    return {
        "prompt": report.prompt,
        "tokens": report.tokens,
        "n_layers": report.n_layers,
        "rows": "row r = the residual stream after block r-1, where layer r-1's features write (row 0: embeddings)",
        "prediction": report.prediction,
        "proposals": report.proposals,
        "concepts": [_trace_json(t) for t in report.traces],
        "paths": [_path_json(p) for p in report.paths],
        "patching": _patching_json(report.patching) if report.patching else None,
        "trajectories": _trajectories_json(report.trajectories) if report.trajectories else None,
        "funnel": {k: _floats(v) for k, v in report.funnel.items()} if report.funnel else None,
        "graph_cells": {f"{r},{p}": ids for (r, p), ids in sorted(report.graph_cells.items())},
    }


def render_concepts_html(report: ConceptReport) -> str:
    """One self-contained page: the charts' script (`charts.js`) inlined, every text escaped, no external
    resource."""
    figs = figures(report)
    sections = "\n".join(
        f'<section><h2>{html.escape(name)}</h2><div id="fig{i}" class="fig"></div></section>'
        for i, name in enumerate(figs)
    )
    charts_js = (ASSETS / "charts.js").read_text(encoding="utf-8")
    charts_css = (ASSETS / "charts.css").read_text(encoding="utf-8")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>concept traces: {html.escape(report.prompt)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:900px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} code{{background:#f4f4f4}}</style>
<style>{charts_css}</style>
<script>{charts_js}</script>
</head><body>
<h1>Concept traces</h1>
<p>Prompt: <code>{html.escape(report.prompt)}</code> → prediction <b>{html.escape(report.prediction)}</b></p>
<p>Tokens: {" ".join(f"<code>{html.escape(t)}</code>" for t in report.tokens)}</p>
<p>Auto-proposed intermediate concepts: {html.escape(", ".join(report.proposals) or "none")}</p>
<p>Rows: the residual stream the logit lens reads, from the embeddings to "after block {report.n_layers - 1}" (the
transcoder features of layer l write into the stream after block l).</p>
{_paths_table(report.paths)}
{_patching_line(report.patching)}
{sections}
<script type="application/json" id="figures">{_script_json(list(figs.values()))}</script>
<script>
const FIGURES = JSON.parse(document.getElementById("figures").textContent);
const drawAll = () => FIGURES.forEach((f, i) => CircuitsCharts.draw(document.getElementById(`fig${{i}}`), f));
drawAll();
window.addEventListener("resize", drawAll);
</script>
</body></html>
"""


def write_concepts_page(report: ConceptReport, out_dir: Path) -> Path:
    """Write concepts.html, concepts.json and (when a path was scored) flow.gif; return the page's path."""
    out_dir = Path(out_dir)
    write_json(out_dir / "concepts.json", report_json(report), indent=1)
    if report.paths:
        with atomic_file(out_dir / "flow.gif", "wb") as f:
            f.write(flow_gif(flow_steps(report), report.tokens, report.n_layers))
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
    head = "<tr><th>path</th><th>score</th><th>baseline</th><th>peaks (row, position)</th>"
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
