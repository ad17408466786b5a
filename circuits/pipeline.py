"""The pipeline behind `circuits trace`: prompt -> graph -> concept report -> page."""

from __future__ import annotations

import json
from pathlib import Path

from transformer_lens import HookedTransformer

from circuits.attribution.attribute import attribute
from circuits.attribution.graph import Graph
from circuits.concepts.report import concept_report, figures
from circuits.fileio import atomic_file
from circuits.page.assemble import PageInfo, PageOptions, annotate, feature_cards, write_page
from circuits.page.supernodes import suggest_supernodes
from circuits.transcoders.clt import CrossLayerTranscoder


def concept_figures(model, prompt: str, json_path: Path, concepts=(), paths=(), counterfactual=None) -> dict:
    """The concept-trace figures of `prompt` (`circuits.concepts_page`), their cells linked to the
    graph's nodes; with no concepts and no paths, the proposed intermediate and the prediction;
    patching against `counterfactual` (default: one proposed by the concepts module)."""
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


def load_pair(model: str = "demo", transcoder: str = "demo", device: str = "cpu"):
    """(model, transcoder) by name; refuses a transcoder that does not fit the model."""
    from circuits.models import load_model
    from circuits.transcoders.load import load_transcoder

    lm = load_model(model, device=device)
    return lm, load_transcoder(transcoder, model=lm, device=device)


def trace_to_files(
    prompt: str,
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    out: Path,
    slug: str | None = None,
    scan: str = "",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    prune: bool = True,
    **attribute_kwargs,
) -> tuple[Graph, dict[str, Path]]:
    """The pipeline behind `circuits trace`: attribute, write `<out>/<slug>.json` (the graph in the
    circuit-tracer schema, pruned unless `prune` is False) and `<out>/<slug>.graph.safetensors` (the
    full graph). Returns the graph and the written paths."""
    graph = attribute(prompt, model, transcoder, **attribute_kwargs)
    graph.config.update(transcoder=scan)
    slug = slug or slugify(prompt)
    paths = {"json": Path(out) / f"{slug}.json", "graph": Path(out) / f"{slug}.graph.safetensors"}
    graph.save(paths["graph"])
    graph.to_json(
        paths["json"], slug=slug, scan=scan, node_threshold=node_threshold, edge_threshold=edge_threshold, prune=prune
    )
    return graph, paths


def slugify(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:60] or "graph"
