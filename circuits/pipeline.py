"""The pipeline behind `circuits trace`: prompt -> graph -> concept report -> page, in memory.

`trace` attributes the prompt, builds the graph JSON once, traces the concepts beside the graph's
nodes, computes the feature cards once, annotates the JSON (the cards' labels, suggested
supernodes), then writes `<out>/<slug>.json` (that JSON), `<slug>.graph.safetensors` (the full
graph) and `<slug>.html` (the page, from the same JSON and cards). Nothing is read back from disk;
the options are checked before any work, and the three files are written only once everything has
been computed, while holding a lock on the output folder: two runs with the same slug leave the
three files of one of them, never a mix.

The attribution, interventions and concepts modules (which import TransformerLens) are imported by
`trace` itself: making the options, and refusing bad ones, stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from circuits.attribution import schema
from circuits.errors import CircuitsError, check_output, check_range, check_text
from circuits.fileio import atomic_file, locked, write_json
from circuits.page.assemble import PageInfo, PageOptions, feature_cards, render_page
from circuits.page.supernodes import suggest_supernodes

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from circuits.attribution.estimate import Estimate
    from circuits.attribution.graph import Graph
    from circuits.attribution.interventions import ValidationReport
    from circuits.concepts.report import ConceptReport
    from circuits.features import FeatureScan
    from circuits.transcoders.clt import CrossLayerTranscoder


@dataclass
class TraceOptions:
    """What `trace` computes and where it writes it (the flags of `circuits trace`)."""

    out: Path = Path("traces")
    """Output directory (not `graphs/`: that is the committed gallery)."""
    slug: str | None = None
    """File name stem (default: from the prompt)."""
    model_name: str = "demo"
    """The model's name, for the page header."""
    transcoder_name: str = "demo"
    """The transcoder's name, for the page header, the JSON's `metadata.scan` and the graph's config."""
    targets: list[str] = field(default_factory=list)
    """Target tokens, or A-B for a logit difference (default: the top predictions)."""
    batch_size: int | None = None
    """Targets per backward pass (default: as many as 16 MB of gradients hold)."""
    max_feature_nodes: int | None = 8192
    """Keep only this many feature nodes, the most influential (None: every active feature)."""
    inhibited: int = 5
    """List this many inactive features the graph suppresses most."""
    max_memory: int | None = None
    """Refuse, before any work, an attribution predicted to peak above this many bytes (None: above
    the memory available, estimated on prompts of `ESTIMATE_FROM_TOKENS` tokens or more only)."""
    device: str = "cpu"
    node_threshold: float = 0.8
    """Cumulative influence of the nodes kept in the JSON."""
    edge_threshold: float = 0.98
    """Cumulative influence of the edges kept in the JSON."""
    prune: bool = True
    """False: the JSON holds the full graph, every node and nonzero edge."""
    validate: bool = False
    """Ablate the top features and compare with the graph's predictions."""
    concept_traces: bool = True
    """Concept-trace panels on the page."""
    concepts: list[str] = field(default_factory=list)
    """Concepts to trace beside the graph (none and no paths: the proposed intermediate and the prediction)."""
    paths: list[list[str]] = field(default_factory=list)
    """Concept chains to score, e.g. ["Dallas", "Texas", "Austin"]."""
    counterfactual: str | None = None
    """The prompt to patch against (default: one proposed from `categories`)."""
    categories: dict[str, list[str]] | None = None
    """Word categories for `@name` concepts, proposed counterfactuals and trajectory variants (e.g. the
    demo world's `circuits.demo.facts.CATEGORIES`); None: none are proposed."""
    heads: bool = False
    """Add each link's head loadings to the JSON (`circuits.attribution.heads`)."""
    page: PageOptions = field(default_factory=PageOptions)

    def __post_init__(self) -> None:
        """Refuse bad options in one line before any work."""
        if self.slug is not None:
            check_slug(self.slug)  # the outputs stay inside `out`
        check_output(self.out)
        check_range("node_threshold", self.node_threshold, 0.0, 1.0)
        check_range("edge_threshold", self.edge_threshold, 0.0, 1.0)
        check_range("inhibited", self.inhibited, 0, integer=True)
        for name in ("batch_size", "max_feature_nodes"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, integer=True)
        for text in [*self.concepts, *self.targets, *(w for p in self.paths for w in p), self.counterfactual or ""]:
            check_text("a concept, path, target or counterfactual", text)


@dataclass
class TraceResult:
    """What `trace` computed, and the files it wrote."""

    graph: Graph  # the full graph, as in the .graph.safetensors file
    data: dict  # the graph JSON as written: pruned (unless options.prune is False) and annotated
    cards: dict[str, dict]  # feature cards by node id (empty without a feature scan)
    validation: ValidationReport | None
    report: ConceptReport | None
    json_path: Path
    graph_path: Path
    page_path: Path
    attention: dict | None = None  # with options.heads: what the page shows of attention (`qk.attention_page`)


def trace(
    prompt: str,
    model: HookedTransformer,
    transcoder: CrossLayerTranscoder,
    options: TraceOptions | None = None,
    features: FeatureScan | None = None,
) -> TraceResult:
    """Attribute `prompt`, trace its concepts, and write the graph JSON, the full graph and the page
    into `options.out`; `features` is the feature scan of `transcoder` for the feature cards."""
    from circuits.attribution.attribute import attribute
    from circuits.attribution.estimate import ESTIMATE_FROM_TOKENS, check_memory
    from circuits.attribution.interventions import validate
    from circuits.concepts.report import resolve_concepts
    from circuits.models import prompt_tokens

    options = options or TraceOptions()
    check_text("the prompt", prompt)
    slug = slugify(prompt) if options.slug is None else options.slug
    resolve_concepts(model, options.concepts, options.paths, options.categories or {})  # unknown words: before any work
    if options.max_memory is not None or len(prompt_tokens(model, prompt)[0]) >= ESTIMATE_FROM_TOKENS:
        check_memory(estimate_trace(prompt, model, transcoder, options), options.max_memory)
    graph = attribute(prompt, model, transcoder, **_attribution_options(options))
    graph.config["transcoder"]["name"] = options.transcoder_name
    data = schema.to_dict(
        graph, slug, options.transcoder_name, options.node_threshold, options.edge_threshold, options.prune
    )
    attention = _attention(graph, data, model, transcoder, features) if options.heads else None
    validation = validate(graph, model, transcoder) if options.validate else None
    report = _concept_report(model, prompt, data["nodes"], options) if options.concept_traces else None
    cards = feature_cards(data, features)
    labels = {nid: card["label"] for nid, card in cards.items()}
    data = schema.annotate(data, labels, suggest_supernodes(data, options.page.supernode_threshold, labels))
    out = Path(options.out)
    result = TraceResult(
        graph, data, cards, validation, report,
        out / f"{slug}.json", out / f"{slug}.graph.safetensors", out / f"{slug}.html", attention,
    )  # fmt: skip
    _write(result, options)
    return result


def estimate_trace(
    prompt: str, model: HookedTransformer, transcoder: CrossLayerTranscoder, options: TraceOptions | None = None
) -> Estimate:
    """The predicted peak memory and time of `trace`'s attribution (one forward pass, no attribution)."""
    from circuits.attribution.estimate import estimate

    return estimate(prompt, model, transcoder, **_attribution_options(options or TraceOptions()))


def _attribution_options(options: TraceOptions) -> dict:
    return dict(
        targets=options.targets, batch_size=options.batch_size, max_feature_nodes=options.max_feature_nodes,
        device=options.device, inhibited=options.inhibited,
    )  # fmt: skip


def _attention(graph: Graph, data: dict, model: HookedTransformer, transcoder, features: FeatureScan | None) -> dict:
    """Head loadings into every link of `data`, in place, and what the page shows of attention, with
    the labels of the features among its QK terms."""
    from circuits.attribution.heads import annotate_links
    from circuits.attribution.qk import attention_page, feature_sources

    annotate_links(data, graph, model, transcoder)
    page = attention_page(model, transcoder, graph.tokens, data["links"], graph.config["attribution"]["dtype"])
    sources = feature_sources(page) if features is not None else []
    page["labels"] = {source: features.card(layer, feature)["label"] for source, layer, feature in sources}
    page["tokens"] = graph.token_strs
    return page


def _concept_report(model: HookedTransformer, prompt: str, nodes: list[dict], options: TraceOptions) -> ConceptReport:
    """The concept report of `prompt`, its cells linked to the graph JSON's `nodes`."""
    from circuits.concepts.report import concept_report

    return concept_report(
        model,
        prompt,
        options.concepts,
        options.paths,
        counterfactual=options.counterfactual,
        graph_nodes=nodes,
        categories=options.categories,
    )


def _write(result: TraceResult, options: TraceOptions) -> None:
    """The three files of a trace, rendered in memory first, then each written atomically while
    holding the output folder's lock (another run writing the same slug waits its turn)."""
    from circuits.concepts.report import figures

    figs = None if result.report is None else figures(result.report)
    page = render_page(result.data, cards=result.cards, figures=figs, info=page_info(result, options),
                       options=options.page, attention=result.attention)  # fmt: skip
    with locked(options.out):
        result.graph.save(result.graph_path)
        write_json(result.json_path, result.data)
        with atomic_file(result.page_path) as f:
            f.write(page)


def page_info(result: TraceResult, options: TraceOptions) -> PageInfo:
    """The page header's facts the graph JSON does not carry: names, top predictions, validation."""
    graph, validation = result.graph, result.validation
    return PageInfo(
        model=options.model_name,
        transcoder=options.transcoder_name,
        top_predictions=list(zip(graph.target_names, graph.target_probs.tolist(), strict=True)),
        validation={}
        if validation is None
        else {"attention frozen": validation.corr_frozen, "attention recomputed": validation.corr_free},
    )


def load_pair(
    model: str = "demo", transcoder: str = "demo", device: str = "cpu", dtype: str = "float32"
) -> tuple[HookedTransformer, CrossLayerTranscoder]:
    """(model, transcoder) by name, in `dtype`. The model is loaded with the weight processing the
    transcoder was trained with (circuit-tracer's convention, and the default: none); a pair that does
    not fit (sizes, hooks, processing) is refused in one line."""
    from circuits.models import PROCESSING, load_model
    from circuits.transcoders.clt import check_fits
    from circuits.transcoders.load import load_transcoder

    clt = load_transcoder(transcoder, device=device, dtype=dtype)  # decoders memory-mapped: cheap
    processing = clt.cfg.model_processing if clt.cfg.model_processing in PROCESSING else "none"
    lm = load_model(model, device=device, processing=processing, dtype=dtype)
    check_fits(clt.cfg, lm)
    return lm, clt


def check_slug(slug: str) -> str:
    """`slug` if it is a plain file name stem: the outputs stay inside the output directory."""
    if slug in (".", "..") or Path(slug).name != slug or "\\" in slug or not slug.strip():
        raise CircuitsError(f"--slug {slug!r} is not a file name: use letters, digits and dashes, no / or ..")
    return slug


def slugify(text: str) -> str:
    """A file name stem from `text`: its lowercase words joined by '-', at most 60 characters."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:60] or "graph"
