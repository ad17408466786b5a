"""Figures of the concept traces: chart specs for the pages and the reasoning-flow GIF (Pillow).

A chart spec is plain JSON that `circuits/concepts/charts.js` draws as SVG sized to its box (a few
kilobytes of script instead of a 4.8 MB plotting library). Kinds:
  heatmap  x (column labels), y (row labels, row 0 drawn at the bottom), grids [{title, z [row][col]}]
           sharing one colour scale ("viridis" from zmin, or "diverging" around 0), optional per-cell
           `hover` arrays and `marks` [{row, col, text}]
  bars     categories, series [{name, values}] (horizontal grouped bars), max
  lines    x, series [{name, values}], ylabel
  scatter  series [{name, color, x, y, (z), text, width, legend}], points (a label per point), xlabel,
           ylabel, (zlabel: three dimensions, drawn as a projection the reader rotates by dragging)
  flow     x, y, steps [{concept, row, col, prob}]: bubbles appearing in order, with arrows
Strings are raw: the script writes them with textContent, never as markup.

Rows of residual-stream figures are the states the logit lens reads: row 0 the embeddings, row r the
stream after block r - 1 ("after block r-1"), where the MLP outputs of block r - 1, and so the
transcoder features of layer r - 1, have been added (the graph's numbering).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from circuits.concepts.lens import ConceptTrace
    from circuits.concepts.patching import PatchingResult
    from circuits.concepts.paths import PathScore
    from circuits.concepts.trajectories import Trajectories

# 12 answers before a colour repeats
PALETTE = "#1f77b4 #d62728 #2ca02c #9467bd #ff7f0e #8c564b #e377c2 #17becf #bcbd22 #7f7f7f #393b79 #e7969c".split()


def token_labels(tokens: list[str]) -> list[str]:
    """Unique x-axis labels: "3 Dallas"."""
    return [f"{i} {t}" for i, t in enumerate(tokens)]


def residual_labels(n_rows: int) -> list[str]:
    """Row labels of residual-stream states: "embed", "after block 0", ..., "after block n_rows-2"."""
    return ["embed", *(f"after block {b}" for b in range(n_rows - 1))]


def trace_figure(trace: ConceptTrace, tokens: list[str]) -> dict:
    """Heatmap of a concept's logit-lens probability, residual row x position, its peak starred; hover
    shows log-prob, rank and logit."""
    rows = trace.prob.shape[0]
    layer, pos = trace.peak()
    anchored = " (a word of the prompt: anchored at its token)" if trace.anchor_position is not None else ""
    return {
        "type": "heatmap",
        "title": f"P({trace.concept.name}) by the logit lens{anchored}",
        "x": token_labels(tokens),
        "y": residual_labels(rows),
        "grids": [{"title": "", "z": _rounded(trace.prob)}],
        "scale": "viridis",
        "zmin": 0,
        "zmax": 1,
        "value": "p",
        "hover": {"logp": _rounded(trace.logprob), "rank": trace.rank.tolist(), "logit": _rounded(trace.logit)},
        "marks": [{"row": layer, "col": pos, "text": "peak"}],
    }


def writers_figure(trace: ConceptTrace, tokens: list[str]) -> dict:
    """Direct logit contribution to the concept of each block's attention and MLP output."""
    limit = float(max(trace.attn_direct.abs().max(), trace.mlp_direct.abs().max(), 1e-6))
    return {
        "type": "heatmap",
        "title": f"which block writes {trace.concept.name} (direct logit contribution)",
        "x": token_labels(tokens),
        "y": [f"block {b}" for b in range(trace.attn_direct.shape[0])],
        "grids": [
            {"title": "attention output", "z": _rounded(trace.attn_direct)},
            {"title": "MLP output (the transcoder features of that layer)", "z": _rounded(trace.mlp_direct)},
        ],
        "scale": "diverging",
        "zmin": -limit,
        "zmax": limit,
        "value": "logit",
    }


def paths_figure(paths: list[PathScore]) -> dict:
    return {
        "type": "bars",
        "title": "multi-hop path scores",
        "categories": [" → ".join(p.path) for p in paths],
        "series": [
            {"name": "continuous score", "values": [round(p.score, 4) for p in paths]},
            {"name": "baseline (×0.5 out of order)", "values": [round(p.baseline, 4) for p in paths]},
        ],
        "max": 1,
    }


def patching_figure(result: PatchingResult, kind: str, tokens: list[str]) -> dict:
    """Recovered logit difference per (row, position). resid_pre rows are residual-stream states (the
    input of block l is the stream after block l - 1); the others are blocks, or (block, head)."""
    grid = result.grids[kind]
    if kind == "head":
        y = [f"block {b} head {h}" for b in range(grid.shape[0]) for h in range(grid.shape[1])]
        grid = grid.flatten(0, 1)
    elif kind == "resid_pre":
        y = residual_labels(grid.shape[0] + 1)[:-1]
    else:
        y = [f"block {b}" for b in range(grid.shape[0])]
    return {
        "type": "heatmap",
        "title": f"patching {kind}: recovered logit diff {result.answer} − {result.foil}",
        "x": token_labels(tokens),
        "y": y,
        "grids": [{"title": "", "z": _rounded(grid)}],
        "scale": "diverging",
        "zmin": -1,
        "zmax": 1,
        "value": "recovered",
    }


def trajectories_figure(traj: Trajectories, n_rows: int) -> dict:
    """Each prompt's path through the first two (or three: drawn rotatable) principal components, one
    point per residual row; colour by answer, the page's own prompt (the first) drawn thick."""
    answers = sorted({a for v in traj.answers.values() for a in v})
    three_d = traj.pca.components.shape[0] >= 3
    series, in_legend = [], set()
    for s, (name, coords) in enumerate(traj.coords.items()):
        for i, prompt in enumerate(traj.sets[name]):
            answer = traj.answers[name][i]
            series.append({
                "name": f"{name}: {answer}" if len(traj.coords) > 1 else answer,
                "color": PALETTE[answers.index(answer) % len(PALETTE)],
                "x": _rounded(coords[i, :, 0]), "y": _rounded(coords[i, :, 1]),
                **({"z": _rounded(coords[i, :, 2])} if three_d else {}),
                "text": prompt, "width": 3.5 if s == i == 0 else 1.2, "legend": (name, answer) not in in_legend,
            })  # fmt: skip
            in_legend.add((name, answer))
    pc = [f"PC{j + 1} ({v:.0%})" for j, v in enumerate(traj.pca.explained.tolist())]
    return {
        "type": "scatter",
        "title": "residual-stream trajectories of the prompt (thick) and its variants, by answer",
        "series": series,
        "points": residual_labels(n_rows),
        "xlabel": pc[0],
        "ylabel": pc[1],
        **({"zlabel": pc[2]} if three_d else {}),
    }


def funnel_figure(funnel: dict[str, torch.Tensor]) -> dict:
    ratio = funnel["ratio"]
    return {
        "type": "lines",
        "title": "funnel: spread of same-answer prompts / spread of all prompts",
        "x": residual_labels(ratio.shape[0]),
        "series": [{"name": "ratio", "values": _rounded(ratio)}],
        "ylabel": "ratio",
    }


def flow_steps(path: PathScore, traces: dict[str, ConceptTrace]) -> list[dict]:
    """The bubbles of a path in order: concept, (layer, position), probability."""
    return [
        {"concept": name, "layer": layer, "position": pos, "prob": traces[name].peak_prob_rank()[0]}
        for name, (layer, pos) in zip(path.path, path.peaks, strict=True)
    ]


def flow_figure(steps: list[dict], tokens: list[str], n_layers: int) -> dict:
    """Animated reasoning flow: bubbles at each concept's peak (residual row, position) appear in path
    order, with arrows."""
    return {
        "type": "flow",
        "title": "reasoning flow: " + " → ".join(s["concept"] for s in steps),
        "x": token_labels(tokens),
        "y": residual_labels(n_layers + 1),
        "steps": [
            {"concept": s["concept"], "row": s["layer"], "col": s["position"], "prob": round(s["prob"], 4)}
            for s in steps
        ],
    }


def _rounded(t: torch.Tensor) -> list:
    """Nested lists of floats with 4 decimals: what a chart shows, at a fraction of the bytes."""
    return torch.round(t.float(), decimals=4).tolist()


def flow_gif(steps: list[dict], tokens: list[str], n_layers: int, size: tuple[int, int] = (760, 420)) -> bytes:
    """The reasoning flow as an animated GIF (one frame per hop, the last held), drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 100, 20, 30, 90
    font = ImageFont.load_default(size=12)
    rows = residual_labels(n_layers + 1)

    def xy(pos: int, layer: int) -> tuple[float, float]:
        x = left + (pos + 0.5) * (width - left - right) / len(tokens)
        y = height - bottom - (layer + 0.5) * (height - top - bottom) / (n_layers + 1)
        return x, y

    frames = []
    for k in range(1, len(steps) + 1):
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        for layer, label in enumerate(rows):
            draw.text((8, xy(0, layer)[1] - 6), label, fill="gray", font=font)
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
