"""Assemble one self-contained, offline HTML page per prompt: header, graph view, side panel
(node details, feature cards, supernodes) and concept-trace panels.

Input is a graph in the circuit-tracer / Neuronpedia JSON schema (`circuits.attribution.schema`),
optionally with the feature cards of its features (`feature_cards`, from the feature scan of its
transcoder, `circuits.features`) and the chart specs of the concept traces (`circuits.concepts.figures`,
drawn in the concept panel: `circuits.page.panels`, `concepts.js`). Every script and style
is inlined; no tag loads anything. Strings from the model or the user reach the page in two ways
only: through `html.escape` into markup, or as JSON inside `<script type="application/json">` with
`<`, `>` and `&` written as \\u escapes (and, in pyvis's drawing script, through Jinja's `tojson`,
which does the same); the page's own JS writes them with `textContent` and draws them on the
canvas, never as HTML.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.attribution.schema import transcoder_features
from circuits.errors import CircuitsError
from circuits.fileio import atomic_file
from circuits.page.graph_view import ViewOptions, build_view, network_assets
from circuits.page.panels import panel_data, panel_html
from circuits.page.recurrence import restyle
from circuits.page.supernodes import suggest_supernodes

if TYPE_CHECKING:
    from circuits.features import FeatureScan

ASSETS = Path(__file__).parent
CHARTS = Path(__file__).parent.parent / "concepts"  # charts.js, charts.css


@dataclass
class PageInfo:
    """Header facts the graph JSON does not carry."""

    model: str = ""
    transcoder: str = ""
    top_predictions: list[tuple[str, float]] = field(default_factory=list)
    """(token, probability), best first; default: the graph's logit nodes."""
    validation: dict[str, float] = field(default_factory=dict)
    """e.g. {"attention frozen": 0.99, "attention recomputed": 0.95}: correlation of predicted and
    measured ablation effects."""
    predictions_caption: str = "top predictions"
    facts: list[tuple[str, str, str]] = field(default_factory=list)
    """More header facts, (name, value, tooltip), shown first."""


@dataclass
class PageOptions:
    view: ViewOptions = field(default_factory=ViewOptions)
    supernode_threshold: float = 0.8
    """Cosine of link profiles above which features at one position are suggested as a group."""


def feature_cards(graph: dict, features: FeatureScan | None) -> dict[str, dict]:
    """The feature card of every transcoder feature the graph JSON names (its feature nodes and
    suppressed features), keyed by node id; empty without a scan."""
    if features is None:
        return {}
    L, F = features.max_activation.shape
    cards = {}
    for node_id, layer, feature in transcoder_features(graph):
        if not (0 <= layer < L and 0 <= feature < F):
            raise CircuitsError(
                f"node {node_id} is outside the feature scan ({L} layers x {F} features): "
                "pass the scan of the graph's transcoder"
            )
        cards[node_id] = features.card(layer, feature)
    return cards


def render_page(
    graph: dict,
    cards: dict[str, dict] | None = None,
    figures: dict | None = None,
    info: PageInfo | None = None,
    options: PageOptions | None = None,
    attention: dict | None = None,
    recurrence: dict | None = None,
) -> str:
    """The page as one HTML string. `graph`: the graph JSON; `cards`: the feature cards of its
    features by node id (`feature_cards`); `figures`: {name: chart spec} of the concept traces
    (`circuits.concepts.report.figures`, shown in tabs in that order); `attention`: head loadings, patterns
    and QK terms (`circuits.attribution.qk.attention_page`), shown by `heads.js` when an edge is clicked;
    `recurrence`: a global circuit's frequencies and prompts (`circuits.page.recurrence.page_data`, the
    graph from its `graph_json`): nodes sized by frequency, shaded by mean influence, and on a click
    the prompts that keep the node (`recurrence.js`)."""
    info, options, cards = info or PageInfo(), options or PageOptions(), cards or {}
    labels = {nid: card["label"] for nid, card in cards.items()}
    view = build_view(graph, labels, options.view)
    if recurrence is not None:
        restyle(view.nodes, recurrence)
    assets = network_assets(view)
    shown = {(e["from"], e["to"]) for e in view.edges}
    panel = panel_data(figures, graph, view.n_layers) if figures else None
    suggestions = (graph.get("qParams") or {}).get("supernodes") or suggest_supernodes(
        graph, options.supernode_threshold, labels
    )
    data = {
        "graph": {
            "metadata": graph["metadata"],
            "qParams": graph.get("qParams", {}),
            "nodes": graph["nodes"],
            "links_not_shown": [
                [link["source"], link["target"], link["weight"]]
                for link in graph["links"]
                if (link["source"], link["target"]) not in shown
            ],
        },
        "cards": cards,
        "suggestions": suggestions,
        "n_layers": view.n_layers,
        "tokens": view.tokens,
        "geometry": view.geometry,
        "positions": recurrence is None,  # columns are token positions (else frequencies)
    }
    page_js = (ASSETS / "page.js").read_text(encoding="utf-8")
    page_css = (ASSETS / "page.css").read_text(encoding="utf-8")
    concepts = _concept_assets(panel) if panel else {"css": "", "html": "", "js": ""}
    title = html.escape(graph["metadata"].get("prompt", ""))
    header = _header(graph, view, info, labels, options.view.top_k_edges)
    main = _main(concepts["html"], _count(view.nodes, "inhibited"), recurrence is not None)
    views = _view(attention, "attention", "heads") + _view(recurrence, "recurrence", "recurrence")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{assets['css']}</style>\n<style>{page_css}</style>\n{concepts['css']}\n{_script(assets['js'])}\n"
        f"</head>\n<body>\n{header}\n{main}\n"
        f'<script type="application/json" id="circuits-data">{script_json(data)}</script>\n'
        f"{_script(assets['draw'])}\n{_script(page_js)}\n{concepts['js']}\n{views}</body>\n</html>\n"
    )


def _view(data: dict | None, name: str, stem: str) -> str:
    """A view on top of page.js: its data (JSON in `script#circuits-{name}`), `{stem}.css` and `{stem}.js`
    (the attention view: heads.js; a global circuit's: recurrence.js), or nothing without its data."""
    if data is None:
        return ""
    css, js = ((ASSETS / f"{stem}.{ext}").read_text(encoding="utf-8") for ext in ("css", "js"))
    element = f'<script type="application/json" id="circuits-{name}">{script_json(data)}</script>'
    return f"<style>{css}</style>\n{element}\n{_script(js)}\n"


def write_page(path: str | Path, graph: dict, **kwargs) -> Path:
    """Render (see `render_page`) and write the page atomically; returns its path."""
    path = Path(path)
    text = render_page(graph, **kwargs)
    with atomic_file(path) as f:
        f.write(text)
    return path


def script_json(value) -> str:
    """JSON that is safe inside a <script> element: no `<`, `>` or `&` survives literally."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    for char in "&<>\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _script(js: str) -> str:
    """Inline code; a `</script` inside would end the element early (data never gets here: it is
    JSON-escaped)."""
    if re.search(r"</script", js, flags=re.I):
        raise RuntimeError("an inlined script contains '</script': it cannot be embedded as is")
    return f"<script>{js}</script>"


def _concept_assets(panel: dict) -> dict[str, str]:
    """The concept panel's styles, markup and scripts (its data, the charts, the panel's behaviour)."""
    css, js = (CHARTS / "charts.css", ASSETS / "concepts.css"), (CHARTS / "charts.js", ASSETS / "concepts.js")
    return {
        "css": "\n".join(f"<style>{path.read_text(encoding='utf-8')}</style>" for path in css),
        "html": panel_html(panel),
        "js": f'<script type="application/json" id="concepts-data">{script_json(panel)}</script>\n'
        + "\n".join(_script(path.read_text(encoding="utf-8")) for path in js),
    }


# ---- markup ----------------------------------------------------------------------------------


def _header(graph: dict, view, info: PageInfo, labels: dict[str, str], top_k: int | None) -> str:
    meta = graph["metadata"]
    predictions = info.top_predictions or [(n["token"], n["prob"]) for n in view.nodes if n["kind"] == "logit"]
    preds = "".join(
        f'<li><span class="tok">{html.escape(str(t))}</span> <span class="num">{p:.3f}</span></li>'
        for t, p in sorted(predictions, key=lambda tp: -tp[1])
    )
    drawn = [n for n in view.nodes if n["kind"] != "inhibited"]
    kinds = ", ".join(f"{_count(drawn, k)} {k}s" for k in ("feature", "error", "embedding", "logit"))
    n_drawn_edges = sum(not e.get("inhibited") for e in view.edges)
    kept = "every edge" if top_k is None else f"each node's {top_k} strongest edges by |weight| (in or out)"
    n_suppressed = _count(view.nodes, "inhibited")
    facts = [
        *info.facts,
        ("model", info.model or "", "the model traced"),
        ("transcoder", info.transcoder or meta.get("scan", ""), "the transcoder whose features replace the MLPs"),
        (
            "replacement score",
            _number(meta.get("replacement_score")),
            "share of the influence on the logits flowing from the tokens through features, not error nodes (1: all)",
        ),
        (
            "completeness score",
            _number(meta.get("completeness_score")),
            "share of the nodes' incoming attribution that comes from features and tokens, not error nodes (1: all)",
        ),
        *(
            (
                f"validation r ({k})",
                _number(v),
                f"correlation of the graph's predicted and the model's measured effects of ablating its features ({k})",
            )
            for k, v in info.validation.items()
        ),
        (
            "node threshold",
            _number(meta.get("node_threshold")),
            "pruning kept the nodes that carry this share of the cumulative influence on the logits",
        ),
        (
            "edge threshold",
            _number(meta.get("edge_threshold")),
            "pruning kept the edges that carry this share of the cumulative influence",
        ),
        (
            "pruned",
            "no (every node and nonzero edge)" if meta.get("pruned") is False else "",
            "the graph is not pruned",
        ),
        ("nodes", str(len(drawn)), f"nodes of the graph, all drawn: {kinds}"),
        (
            "edges",
            f"{n_drawn_edges} drawn of {view.n_links}",
            f"the graph has {view.n_links} edges; drawn: {kept}; the side panel lists them all",
        ),
        (
            "suppressed",
            f"{n_suppressed} hidden" if n_suppressed else "",
            "inactive features the graph's features push down hardest (edges cannot show inhibition); "
            "tick 'suppressed features' to draw them",
        ),
    ]
    rows = "".join(
        f'<div title="{html.escape(tip)}"><dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd></div>'
        for k, v, tip in facts
        if v
    )
    most = "".join(
        f'<li title="{html.escape(r["node_id"])}: pushed down by {r["inhibition"]:+.2f} (summed weight of its '
        f'inhibitors)">{html.escape(_feature_name(r["node_id"], labels))} <span class="num">{r["inhibition"]:+.2f}'
        "</span></li>"
        for r in meta.get("inhibited_features", [])
    )
    suppressed = (
        f'<div class="suppressed"><span class="caption">most suppressed</span><ul>{most}</ul></div>' if most else ""
    )
    return (
        f'<header id="header"><h1 id="prompt">{html.escape(meta.get("prompt", ""))}</h1>'
        f'<div class="predictions" title="the model\'s most probable next tokens"><span class="caption">'
        f'{html.escape(info.predictions_caption)}</span><ol id="predictions">{preds}</ol></div>'
        f'<dl id="facts">{rows}</dl>{suppressed}</header>'
    )


def _feature_name(node_id: str, labels: dict[str, str]) -> str:
    """'L1 #308 "is" → Austin' from the id `1_308_10` and the feature's label."""
    layer, feature, _ = node_id.split("_")
    return f"L{layer} #{feature} {labels.get(node_id, '')}".strip()


def _count(vis_nodes: list[dict], kind: str) -> int:
    return sum(n["kind"] == kind for n in vis_nodes)


def _number(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _main(concepts: str, n_inhibited: int = 0, recurrence: bool = False) -> str:
    """The graph column, side panel and the concept panel's markup (`concepts`, may be empty); the
    "suppressed features" switch only when the graph lists some; with `recurrence`, the note and
    legend of a global circuit (columns are frequencies)."""
    suppressed = (
        f'<label title="{n_inhibited} inactive features the graph pushes down hardest, with their inhibitors">'
        '<input type="checkbox" id="show-inhibited"> suppressed features</label>'
        if n_inhibited
        else ""
    )
    legend = '<i class="lg inhibited"></i>suppressed ' if n_inhibited else ""
    note = (
        "columns: how many prompts keep the node; size: how often, shade: mean influence. Click a node for the "
        "prompts that keep it."
        if recurrence
        else "rows: a feature of layer l writes into the residual stream after block l.\n      Click a node for "
        "its strongest paths to the tokens."
    )
    return f"""<main id="layout" class="{"with-concepts" if concepts else ""}">
<section id="graph-col">
  <div id="toolbar">
    <label title="hide the edges weaker than this |weight| (a quantile of the drawn edges)">edge |w| ≥
      <input type="range" id="edge-threshold" min="0" max="100" step="1" value="0"></label>
    <span id="edge-threshold-value">0</span> <span id="edge-count"></span>
    <span class="search-box"><input type="search" id="search" placeholder="search token, feature, label"
      title="highlights every match; Enter centres the view on them; Esc clears">
      <span id="search-count"></span><ul id="search-results"></ul></span>
    <label><input type="checkbox" id="show-labels" checked> labels</label>
    {suppressed}
    <button type="button" id="subgraph-toggle" title="the pinned nodes alone, supernodes as labelled boxes"
      >subgraph (0)</button>
    <button type="button" id="fit">fit</button>
    <button type="button" id="panel-toggle" title="show or hide the side panel">panel</button>
    <span id="legend"><i class="lg feature"></i>feature <i class="lg error"></i>error <i class="lg embedding"></i>token
      <i class="lg logit"></i>logit <i class="lg supernode"></i>supernode {legend}<i class="lg pos"></i>+ edge
      <i class="lg neg"></i>− edge</span>
    <span id="layer-note">{note}</span>
  </div>
  <div id="graph-area"><div id="mynetwork"></div><div id="subgraph" hidden></div></div>
  <div id="hover-info"></div>
</section>
<aside id="panel">
  <section id="details"><p class="hint">Click a node for its details and its strongest paths to the tokens;
    ctrl-click to select several.</p></section>
  <section id="supernodes"><h2>Supernodes</h2>
    <div class="row"><input type="text" id="supernode-label" placeholder="label"
      ><button type="button" id="group-selected">group selected</button></div>
    <p id="supernode-message"></p>
    <ul id="supernode-list"></ul>
    <h3>Suggested</h3><ul id="suggestions"></ul>
    <button type="button" id="export-json">download graph JSON (with supernodes and pins)</button>
  </section>
</aside>
{concepts}
</main>"""
