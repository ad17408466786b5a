"""The model-comparison page: compare.html (plotly.js inlined, every text escaped, no network request) and
compare.json (every number, plain JSON types)."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import torch

from circuits.concepts.compare import ModelView
from circuits.fileio import atomic_file, write_json

log = logging.getLogger(__name__)

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def compare_json(views: list[ModelView]) -> dict:
    """Every model's numbers in plain JSON types."""
    return {
        "prompts": views[0].trajectories.sets["prompts"],
        "rows": "row r = residual stream after r blocks (0 = embeddings); relative depth = r / n_layers",
        "models": [_view_json(v) for v in views],
    }


def _view_json(v: ModelView) -> dict:
    t = v.trajectories
    return {
        "name": v.name,
        "n_layers": v.n_layers,
        "d_model": v.d_model,
        "summary": v.summary(),
        "answers": t.answers["prompts"],
        "coords": _floats(t.coords["prompts"]),
        "explained_variance": _floats(t.pca.explained),
        "funnel": {k: _floats(x) for k, x in v.funnel.items()} if v.funnel else None,
        "styles": [vars(s) for s in v.styles],
        "split": _split_json(v.split) if v.split else None,
    }


def _split_json(split: dict) -> dict:
    return {k: x if x is None or isinstance(x, int) else _floats(x) for k, x in split.items()}


def _floats(t: torch.Tensor) -> list:
    return torch.round(t.float(), decimals=6).tolist()


def trajectory_figure(view: ModelView, dims: int) -> go.Figure:
    """The prompts' last-token states, row by row, in the model's first `dims` (2 or 3) principal
    components; colour = the model's answer; 3D figures rotate with the mouse."""
    coords = view.trajectories.coords["prompts"]  # [n, L+1, k]
    answers = view.trajectories.answers["prompts"]
    order = list(dict.fromkeys(answers))
    fig = go.Figure()
    for i, prompt in enumerate(view.trajectories.sets["prompts"]):
        style = {
            "mode": "lines+markers",
            "name": html.escape(answers[i]),
            "legendgroup": html.escape(answers[i]),
            "showlegend": answers.index(answers[i]) == i,
            "line": {"color": PALETTE[order.index(answers[i]) % len(PALETTE)], "width": 4 if i == 0 else 1.5},
            "text": [html.escape(prompt)] * coords.shape[1],
            "hovertemplate": "%{text}<br>row %{pointNumber}<extra></extra>",
        }
        xy = {"x": coords[i, :, 0].tolist(), "y": coords[i, :, 1].tolist()}
        if dims == 3 and coords.shape[-1] >= 3:
            fig.add_trace(go.Scatter3d(**xy, z=coords[i, :, 2].tolist(), **style))
        else:
            fig.add_trace(go.Scatter(**xy, **style))
    pcs = [f"PC{j + 1} ({v:.0%})" for j, v in enumerate(view.trajectories.pca.explained.tolist())]
    axes = {"xaxis_title": pcs[0], "yaxis_title": pcs[1]}
    if dims == 3 and len(pcs) >= 3:
        axes = {"scene": {"xaxis_title": pcs[0], "yaxis_title": pcs[1], "zaxis_title": pcs[2]}}
    title = f"{html.escape(view.name)}: trajectories ({dims}D, its own PCA, d_model {view.d_model})"
    fig.update_layout(title=title, height=460, **axes)
    return fig


def per_depth_figure(views: list[ModelView], title: str, series) -> go.Figure:
    """One line per model of `series(view)` ([L+1] values) against the relative depth r / L."""
    fig = go.Figure()
    for i, v in enumerate(views):
        values = series(v)
        if values is None:
            continue
        x = [r / v.n_layers for r in range(v.n_layers + 1)]
        line = {"color": PALETTE[i % len(PALETTE)]}
        fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=html.escape(v.name), line=line))
    fig.update_layout(title=title, height=320, xaxis_title="relative depth (row / n_layers)")
    return fig


def figures(views: list[ModelView], three_d: bool = True) -> dict[str, go.Figure]:
    """Every figure of the comparison, keyed by a stable name."""
    out = {}
    for v in views:
        out[f"trajectories 2D: {v.name}"] = trajectory_figure(v, 2)
        if three_d:
            out[f"trajectories 3D: {v.name}"] = trajectory_figure(v, 3)
    out["funnel"] = per_depth_figure(
        views,
        "funnel: within-answer spread / total spread (lower: same answers together, different ones apart)",
        lambda v: v.funnel["ratio"].tolist() if v.funnel else None,
    )
    if any(v.split for v in views):
        out["split"] = per_depth_figure(
            views,
            "split: distance between the split-answer prompts' centroid and the others' / their radii (> 1: apart)",
            lambda v: v.split["separation"].tolist() if v.split else None,
        )
    out["ambiguity"] = per_depth_figure(
        views,
        "ambiguity: entropy of the logit-lens distribution at the last token (nats, mean over prompts)",
        lambda v: torch.tensor([s.ambiguity for s in v.styles]).mean(0).tolist(),
    )
    out["answer probability"] = per_depth_figure(
        views,
        "the final answer's logit-lens probability at the last token (mean over prompts)",
        lambda v: torch.tensor([s.answer_prob for s in v.styles]).mean(0).tolist(),
    )
    return out


def _summary_table(views: list[ModelView]) -> str:
    keys = list(views[0].summary())
    head = "<tr><th>model</th><th>layers</th><th>d_model</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(v.name)}</td><td>{v.n_layers}</td><td>{v.d_model}</td>"
        + "".join(f"<td>{x:.3f}</td>" for x in v.summary().values())
        + "</tr>"
        for v in views
    )
    return f"<table>{head}{rows}</table>"


def _split_table(views: list[ModelView]) -> str:
    if not any(v.split for v in views):
        return ""
    rows = []
    for v in views:
        row = v.split["row"]
        at = "never" if row is None else f"row {row} of {v.n_layers} (distance {float(v.split['distance'][row]):.2f})"
        rows.append(f"<tr><td>{html.escape(v.name)}</td><td>{at}</td></tr>")
    head = "<tr><th>model</th><th>split-answer prompts part from the rest for good at</th></tr>"
    return f"<h2>Split</h2><table>{head}{''.join(rows)}</table>"


def _prompts_table(views: list[ModelView]) -> str:
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(v.name)}: answer, depth</th>" for v in views)
    rows = []
    for i, prompt in enumerate(views[0].trajectories.sets["prompts"]):
        cells = "".join(
            f"<td>{html.escape(v.styles[i].answer)}, {v.styles[i].decision_depth}/{v.n_layers}</td>" for v in views
        )
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _script_json(value) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survive literally."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_compare_html(views: list[ModelView], three_d: bool = True) -> str:
    """One self-contained page: the summary, per-prompt answers, and every figure."""
    figs = figures(views, three_d)
    specs = [{"id": f"fig{i}", "figure": json.loads(fig.to_json())} for i, fig in enumerate(figs.values())]
    sections = "\n".join(
        f'<section><h2>{html.escape(name)}</h2><div id="fig{i}" class="fig"></div></section>'
        for i, name in enumerate(figs)
    )
    names = " vs ".join(html.escape(v.name) for v in views)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>model comparison: {names}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
<script>{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>Model comparison: {names}</h1>
<p>Thinking style, mean over the prompts. Decision depth: the first row (0 = embeddings) from which the
final answer stays the logit lens's top token; commitment speed: the largest rise of the answer's
probability over one block; ambiguity: entropy (nats) of the lens distribution at the last token.</p>
{_summary_table(views)}
{_split_table(views)}
<h2>Prompts</h2>
{_prompts_table(views)}
{sections}
<script>
const FIGURES = {_script_json(specs)};
for (const f of FIGURES) {{
  const config = {{displaylogo: false, responsive: true}};
  Plotly.newPlot(f.id, {{data: f.figure.data, layout: f.figure.layout, config}});
}}
</script>
</body></html>
"""


def write_compare_page(views: list[ModelView], out_dir: Path, three_d: bool = True) -> Path:
    """Write compare.json and compare.html into `out_dir`; return the page's path."""
    out_dir = Path(out_dir)
    write_json(out_dir / "compare.json", compare_json(views), indent=1)
    page = out_dir / "compare.html"
    with atomic_file(page) as f:
        f.write(render_compare_html(views, three_d))
    log.info("wrote %s", page)
    return page
