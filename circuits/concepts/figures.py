"""Figures of the concept traces: plotly figures for the page and the reasoning-flow GIF (Pillow).

Every string that comes from a prompt or a concept is escaped (`_text`) before it reaches plotly,
which renders a subset of HTML in labels.
"""

from __future__ import annotations

import html
import io
import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from circuits.concepts.lens import ConceptTrace
    from circuits.concepts.patching import PatchingResult
    from circuits.concepts.paths import PathScore
    from circuits.concepts.trajectories import Trajectories


def _text(s: str) -> str:
    """`s` for a plotly label: &, < and > escaped; quotes kept, as plotly shows &quot; literally."""
    return html.escape(s, quote=False)


def token_labels(tokens: list[str]) -> list[str]:
    """Unique, escaped x-axis labels: "3 Dallas"."""
    return [f"{i} {_text(t)}" for i, t in enumerate(tokens)]


def layer_labels(n_rows: int) -> list[str]:
    return ["embed", *(f"after {l}" for l in range(1, n_rows))]


def trace_figure(trace: ConceptTrace, tokens: list[str], graph_cells: dict | None = None) -> go.Figure:
    """Heatmap of a concept's logit-lens probability, layer x position; hover shows log-prob, rank, logit
    and the graph nodes at the cell."""
    rows, cols = trace.prob.shape
    cells = graph_cells or {}
    custom = [
        [
            [float(trace.logprob[l, p]), int(trace.rank[l, p]), float(trace.logit[l, p]), len(cells.get((l, p), []))]
            for p in range(cols)
        ]
        for l in range(rows)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=trace.prob.tolist(),
            x=token_labels(tokens),
            y=layer_labels(rows),
            customdata=custom,
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": "prob"},
            hovertemplate="%{y}, %{x}<br>p=%{z:.3f} logp=%{customdata[0]:.2f} rank=%{customdata[1]}"
            "<br>logit=%{customdata[2]:.2f} graph nodes=%{customdata[3]}<extra></extra>",
        )
    )
    layer, pos = trace.peak()
    star = {"symbol": "star", "size": 16, "color": "red"}
    x, y = [token_labels(tokens)[pos]], [layer_labels(rows)[layer]]
    fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=star, name="peak", hoverinfo="skip"))
    name = _text(trace.concept.name)
    fig.update_layout(title=f"logit lens: P({name}) by layer and position", showlegend=False, height=360)
    return fig


def writers_figure(trace: ConceptTrace, tokens: list[str]) -> go.Figure:
    """Direct logit contribution to the concept of each layer's attention and MLP output."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention output", "MLP output"), shared_yaxes=True)
    limit = float(max(trace.attn_direct.abs().max(), trace.mlp_direct.abs().max(), 1e-6))
    y = [f"layer {l}" for l in range(trace.attn_direct.shape[0])]
    for col, z in ((1, trace.attn_direct), (2, trace.mlp_direct)):
        fig.add_trace(
            go.Heatmap(z=z.tolist(), x=token_labels(tokens), y=y, colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
                       showscale=col == 2, hovertemplate="%{y}, %{x}: %{z:.2f}<extra></extra>"),
            row=1, col=col,
        )  # fmt: skip
    name = _text(trace.concept.name)
    fig.update_layout(title=f"which component writes {name} (direct logit contribution)", height=320)
    return fig


def paths_figure(paths: list[PathScore]) -> go.Figure:
    labels = [_text(" → ".join(p.path)) for p in paths]
    fig = go.Figure(
        [
            go.Bar(name="continuous score", x=labels, y=[p.score for p in paths]),
            go.Bar(name="baseline (×0.5 out of order)", x=labels, y=[p.baseline for p in paths]),
        ]
    )
    fig.update_layout(title="multi-hop path scores", barmode="group", yaxis={"range": [0, 1]}, height=340)
    return fig


def patching_figure(result: PatchingResult, kind: str, tokens: list[str]) -> go.Figure:
    grid = result.grids[kind]
    if kind == "head":
        y = [f"L{l}H{h}" for l in range(grid.shape[0]) for h in range(grid.shape[1])]
        grid = grid.flatten(0, 1)
    else:
        y = [f"layer {l}" for l in range(grid.shape[0])]
    fig = go.Figure(
        go.Heatmap(z=grid.tolist(), x=token_labels(tokens), y=y, colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                   hovertemplate="%{y}, %{x}: %{z:.3f}<extra></extra>")
    )  # fmt: skip
    answer, foil = _text(result.answer), _text(result.foil)
    fig.update_layout(title=f"patching {kind}: recovered logit diff {answer} − {foil}", height=260 + 12 * len(y))
    return fig


def trajectories_figure(traj: Trajectories) -> go.Figure:
    """Each prompt's path through the first two (or three) principal components, one marker per layer."""
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    symbols = ["circle", "diamond", "square", "cross"]
    answers = sorted({a for v in traj.answers.values() for a in v})
    three_d = traj.pca.components.shape[0] >= 3
    in_legend = set()
    for s, (name, coords) in enumerate(traj.coords.items()):
        for i, prompt in enumerate(traj.sets[name]):
            answer = traj.answers[name][i]
            style = {
                "mode": "lines+markers",
                "marker": {"symbol": symbols[s % len(symbols)], "color": palette[answers.index(answer) % len(palette)]},
                "line": {"width": 4 if s == i == 0 else 1.5},  # the first prompt (the page's own) stands out
                "name": _text(f"{name}: {answer}"),
                "showlegend": (name, answer) not in in_legend,
                "text": [_text(prompt)] * coords.shape[1],
                "hovertemplate": "%{text}<br>layer %{pointNumber}<extra></extra>",
                "legendgroup": _text(answer),
            }
            in_legend.add((name, answer))
            xyz = {"x": coords[i, :, 0].tolist(), "y": coords[i, :, 1].tolist()}
            if three_d:
                fig.add_trace(go.Scatter3d(**xyz, z=coords[i, :, 2].tolist(), **style))
            else:
                fig.add_trace(go.Scatter(**xyz, **style))
    ev = [f"PC{j + 1} ({v:.0%})" for j, v in enumerate(traj.pca.explained.tolist())]
    axes = {"xaxis_title": ev[0], "yaxis_title": ev[1]}
    fig.update_layout(
        title="residual-stream trajectories (PCA fitted on all prompts and layers)",
        height=480,
        **({"scene": {"xaxis_title": ev[0], "yaxis_title": ev[1], "zaxis_title": ev[2]}} if three_d else axes),
    )
    return fig


def funnel_figure(funnel: dict[str, torch.Tensor]) -> go.Figure:
    ratio = funnel["ratio"].tolist()
    fig = go.Figure(go.Scatter(x=layer_labels(len(ratio)), y=ratio, mode="lines+markers"))
    fig.update_layout(title="funnel: spread of same-answer prompts / spread of all prompts", height=300)
    return fig


def flow_steps(path: PathScore, traces: dict[str, ConceptTrace]) -> list[dict]:
    """The bubbles of a path in order: concept, (layer, position), probability."""
    return [
        {"concept": name, "layer": layer, "position": pos, "prob": traces[name].peak_prob_rank()[0]}
        for name, (layer, pos) in zip(path.path, path.peaks, strict=True)
    ]


def flow_figure(steps: list[dict], tokens: list[str], n_layers: int) -> go.Figure:
    """Animated reasoning flow: bubbles at each concept's peak appear in path order, with arrows."""
    labels = token_labels(tokens)

    def frame_data(k: int) -> tuple[go.Scatter, list[dict]]:
        shown = steps[:k]
        bubbles = go.Scatter(
            x=[s["position"] for s in shown], y=[s["layer"] for s in shown], mode="markers+text",
            text=[_text(s["concept"]) for s in shown], textposition="top center",
            marker={"size": [18 + 40 * math.sqrt(s["prob"]) for s in shown], "color": "#ff7f0e", "opacity": 0.8},
            hovertemplate="%{text}: p=%{customdata:.3f}<extra></extra>", customdata=[s["prob"] for s in shown],
        )  # fmt: skip
        arrows = [
            {"x": b["position"], "y": b["layer"], "ax": a["position"], "ay": a["layer"], "xref": "x", "yref": "y",
             "axref": "x", "ayref": "y", "showarrow": True, "arrowhead": 3, "arrowwidth": 2, "text": ""}
            for a, b in zip(shown, shown[1:], strict=False)
        ]  # fmt: skip
        return bubbles, arrows

    frames = []
    for k in range(1, len(steps) + 1):
        bubbles, arrows = frame_data(k)
        frames.append(go.Frame(data=[bubbles], layout={"annotations": arrows}, name=str(k)))
    first, _ = frame_data(1)
    fig = go.Figure(data=[first], frames=frames)
    play = {"label": "▶ play", "method": "animate",
            "args": [None, {"frame": {"duration": 900, "redraw": True}, "fromcurrent": False}]}  # fmt: skip
    fig.update_layout(
        title="reasoning flow: " + _text(" → ".join(s["concept"] for s in steps)),
        xaxis={"tickvals": list(range(len(labels))), "ticktext": labels, "range": [-0.5, len(labels) - 0.5]},
        yaxis={"title": "layer", "range": [-0.5, n_layers + 0.7], "dtick": 1},
        updatemenus=[{"type": "buttons", "buttons": [play], "x": 0, "y": 1.15, "showactive": False}],
        sliders=[{"steps": [{"label": _text(s["concept"]), "method": "animate",
                             "args": [[str(k + 1)], {"mode": "immediate", "frame": {"redraw": True}}]}
                            for k, s in enumerate(steps)]}],
        height=420,
    )  # fmt: skip
    return fig


def flow_gif(steps: list[dict], tokens: list[str], n_layers: int, size: tuple[int, int] = (760, 420)) -> bytes:
    """The reasoning flow as an animated GIF (one frame per hop, the last held), drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 60, 20, 30, 90
    font = ImageFont.load_default(size=12)

    def xy(pos: int, layer: int) -> tuple[float, float]:
        x = left + (pos + 0.5) * (width - left - right) / len(tokens)
        y = height - bottom - (layer + 0.5) * (height - top - bottom) / (n_layers + 1)
        return x, y

    frames = []
    for k in range(1, len(steps) + 1):
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        for layer in range(n_layers + 1):
            draw.text((8, xy(0, layer)[1] - 6), "embed" if layer == 0 else f"L{layer}", fill="gray", font=font)
        for pos, token in enumerate(tokens):
            x, _ = xy(pos, 0)
            draw.line([(x, top), (x, height - bottom)], fill="#eeeeee")
            draw.text((x - 4, height - bottom + 8 + 14 * (pos % 3)), token[:12], fill="black", font=font)
        shown = steps[:k]
        for a, b in zip(shown, shown[1:], strict=False):
            _arrow(draw, xy(a["position"], a["layer"]), xy(b["position"], b["layer"]), _radius(b) + 3)
        for s in shown:
            x, y = xy(s["position"], s["layer"])
            r = _radius(s)
            draw.ellipse([x - r, y - r, x + r, y + r], fill="#ffb366", outline="#cc5500", width=2)
            draw.text((x - r, y - r - 16), s["concept"][:20], fill="black", font=font)
        frames.append(img)
    buffer = io.BytesIO()
    durations = [900] * (len(frames) - 1) + [2500]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()


def _radius(step: dict) -> float:
    return 8 + 18 * math.sqrt(step["prob"])


def _arrow(draw, start: tuple[float, float], end: tuple[float, float], stop_short: float) -> None:
    """An arrow from start that stops `stop_short` pixels before end (outside the target bubble)."""
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    end = (end[0] - stop_short * math.cos(angle), end[1] - stop_short * math.sin(angle))
    draw.line([start, end], fill="#555555", width=3)
    head = [end, *((end[0] - 14 * math.cos(angle + s), end[1] - 14 * math.sin(angle + s)) for s in (0.4, -0.4))]
    draw.polygon(head, fill="#555555")
