"""The page step of `circuits trace`: put feature labels and supernode suggestions into the graph
JSON (for other viewers) and write the page next to it (`<out>/<slug>.html`)."""

from __future__ import annotations

import json
from pathlib import Path

from circuits.export.page import PageInfo, PageOptions, annotate, feature_cards, write_page
from circuits.export.supernodes import suggest_supernodes
from circuits.formats import atomic_file


def concept_figures(model, prompt: str, json_path: Path, concepts=(), paths=(), counterfactual=None) -> dict:
    """The concept-trace figures of `prompt` (`circuits.concepts_page`), their cells linked to the
    graph's nodes; with no concepts and no paths, the proposed intermediate and the prediction;
    patching against `counterfactual` (default: one proposed by the concepts module)."""
    from circuits.concepts_page import concept_report, figures

    nodes = json.loads(Path(json_path).read_text(encoding="utf-8"))["nodes"]
    report = concept_report(
        model, prompt, list(concepts), [list(p) for p in paths], counterfactual=counterfactual, graph_nodes=nodes
    )
    return figures(report)


def write_trace_page(
    graph,
    json_path: Path,
    model_name: str,
    transcoder_name: str,
    features=None,
    figures: dict | None = None,
    validation=None,
    options: PageOptions | None = None,
) -> Path:
    """Annotate `json_path` (written by `trace_to_files` for `graph`, a `circuits.graph.Graph`) and
    write the page beside it; `validation` is a `ValidationReport`. Returns the page's path."""
    options = options or PageOptions()
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    cards = feature_cards(data, features)
    labels = {nid: card["label"] for nid, card in cards.items()}
    data = annotate(data, cards, suggest_supernodes(data, options.supernode_threshold, labels))
    with atomic_file(Path(json_path)) as f:
        json.dump(data, f)
    info = PageInfo(
        model=model_name,
        transcoder=transcoder_name,
        top_predictions=list(zip(graph.target_names, graph.target_probs.tolist(), strict=True)),
        validation={}
        if validation is None
        else {"attention frozen": validation.corr_frozen, "attention recomputed": validation.corr_free},
    )
    page = Path(json_path).with_suffix(".html")
    return write_page(page, data, features=features, figures=figures, info=info, options=options)
