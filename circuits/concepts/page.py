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
        "notes": report.notes,
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
{"".join(f'<p class="note">Note: {html.escape(n)}</p>' for n in report.notes)}
<p>Rows: the residual stream the logit lens reads, from the embeddings to "after block {report.n_layers - 1}" (the
transcoder features of layer l write into the stream after block l).</p>
{_paths_table(report.paths)}
{_patching_line(report.patching)}
{_graph_nodes_table(report)}
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
        f"<tr><td>{html.escape(' → '.join(p.path))}</td><td>{p.score:.3f}</td><td>{_causal(p.causal_score)}</td>"
        f"<td>{p.baseline:.3f}</td><td>{_peak_cells(p)}</td><td>{p.ordered_by_position}</td>"
        f"<td>{p.ordered_by_layer}</td><td>{p.completeness:.2f}</td></tr>"
        for p in paths
    )
    head = "<tr><th>path</th><th>lens score</th><th>causal score</th><th>baseline</th>"
    head += "<th>peaks (layer, pos): patching recovery</th>"
    note = (
        "<p>Causal score = lens score × mean recovery (clipped to [0, 1]) when the clean residual stream at each "
        "peak cell is patched into the counterfactual run. <mark>✗</mark> marks a peak cell where the two "
        "disagree: the lens reads the concept there (rank ≤ 5) but the cell does not carry the answer "
        "(recovery &lt; 0.5), or the reverse.</p>"
    )
    return f"<table>{head}<th>pos order</th><th>layer order</th><th>complete</th></tr>{rows}</table>{note}"


def _causal(value: float | None) -> str:
    return "no counterfactual" if value is None else f"{value:.3f}"


def _peak_cells(p: PathScore) -> str:
    """Each hop's peak cell, with its recovery and a mark where the lens and patching disagree."""
    if p.recoveries is None:
        return html.escape(", ".join(str(tuple(x)) for x in p.peaks))
    cells = []
    for (row, pos), recovery, agrees in zip(p.peaks, p.recoveries, p.agrees, strict=True):
        cell = f"({row}, {pos}): {recovery:+.2f}"
        cells.append(cell if agrees else f'<mark title="the lens and patching disagree">✗ {cell}</mark>')
    return ", ".join(cells)


def _graph_nodes_table(report: ConceptReport) -> str:
    """The attribution graph's nodes at each concept's peak cell (when the report has graph nodes)."""
    if not report.graph_cells:
        return ""
    rows = []
    for t in report.traces:
        row, pos = t.peak()
        ids = report.graph_cells.get((row, pos), [])
        shown = ", ".join(ids[:12]) + (f" and {len(ids) - 12} more" if len(ids) > 12 else "")
        cells = [html.escape(t.concept.name), f"({row}, {pos})", html.escape(shown or "none")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>concept</th><th>peak (layer, pos)</th><th>graph nodes there</th></tr>"
    return f"<h2>Graph nodes at each peak</h2><table>{head}{''.join(rows)}</table>"


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
        "anchor": list(t.anchor) if t.anchor else None,
        "scored_whole": list(t.whole),
        "prob": _floats(t.prob),
        "logprob": _floats(t.logprob),
        "rank": t.rank.tolist(),
        "logit": _floats(t.logit),
        "attn_direct": _floats(t.attn_direct),
        "mlp_direct": _floats(t.mlp_direct),
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
        "recoveries": p.recoveries,
        "causal_score": p.causal_score,
        "agrees": p.agrees,
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
