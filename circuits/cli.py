"""The `circuits` command: a thin layer over the Python API.

Every subcommand is a function `_cmd_NAME(args)` registered in `_build_parser`. Known errors
(`CircuitsError`) and command-line mistakes print one line to stderr and exit with status 2. Each
command checks its arguments before it loads anything, and imports the heavy modules (torch,
TransformerLens) only then: `--help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from circuits import __version__
from circuits.errors import CircuitsError, check_output, check_range, check_text

DEFAULT_PROMPT = "Fact: Dallas is in the state whose capital is"


def _demo_categories(model: str) -> dict[str, list[str]] | None:
    """The word categories the concepts stage can propose from: the demo world's for the demo model
    (its states, capitals and cities), none for any other model."""
    from circuits.demo.facts import CATEGORIES

    return CATEGORIES if model == "demo" else None


def _categories(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The named word groups of --vocabulary, then each --group; the demo world's when neither is given."""
    from circuits.concepts.categories import parse_group, read_vocabulary

    groups = read_vocabulary(Path(args.vocabulary)) if args.vocabulary else {}
    groups.update(parse_group(spec) for spec in args.group)
    return groups or _demo_categories(args.model)


def _graph_nodes(args: argparse.Namespace):
    """The model, and the pruned graph JSON's nodes of the prompt with --transcoder (None without)."""
    from circuits.models import load_model

    if not args.transcoder:
        return load_model(args.model, device=args.device, dtype=args.dtype), None
    from circuits.attribution import schema
    from circuits.attribution.attribute import attribute
    from circuits.pipeline import load_pair

    model, clt = load_pair(args.model, args.transcoder, args.device, args.dtype)
    graph = attribute(args.prompt, model, clt, device=args.device)
    return model, schema.to_dict(graph, "concepts", args.transcoder)["nodes"]


def _cmd_predict(args: argparse.Namespace) -> None:
    check_text("the prompt", args.prompt)
    check_range("--top-k", args.top_k, 1, integer=True)
    import torch

    from circuits.models import load_model, prompt_tokens

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    check_range("--top-k", args.top_k, 1, model.cfg.d_vocab, integer=True)
    tokens = prompt_tokens(model, args.prompt)
    with torch.no_grad():
        probs = model(tokens)[0, -1].softmax(-1)
    top = probs.topk(args.top_k)
    print(f"prompt: {args.prompt!r} -> {model.to_str_tokens(tokens)}")
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  {model.to_single_str_token(i)!r:>24}  {p:.3f}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from circuits.demo.lm import evaluate
    from circuits.models import load_model

    accuracy = evaluate(load_model("demo"))
    print(json.dumps({"top1_accuracy": accuracy}, indent=2))


def _cmd_features(args: argparse.Namespace) -> None:
    from circuits.features import FeatureScanConfig, default_features_dir, scan_features
    from circuits.pipeline import load_pair

    given = {"text": args.text, "n_documents": args.documents, "top_k": args.top_k}
    cfg = FeatureScanConfig(**{k: v for k, v in given.items() if v is not None})
    out = check_output(Path(args.out) if args.out else default_features_dir(args.clt))
    model, clt = load_pair(args.model, args.clt, args.device, args.dtype)
    scan_features(model, clt, cfg, clt_name=str(args.clt)).save(out)
    print(out)


def _cmd_trace(args: argparse.Namespace) -> None:
    from circuits.pipeline import TraceOptions, load_pair, trace  # light: options are checked before heavy imports

    options = TraceOptions(
        out=Path(args.out), slug=args.slug, model_name=args.model, transcoder_name=args.transcoder,
        targets=args.target or [], batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes,
        inhibited=args.inhibited, device=args.device, node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold, prune=not args.no_prune, validate=args.validate,
        concept_traces=not args.no_concepts, concepts=args.concept, paths=[p.split(",") for p in args.path],
        categories=_categories(args), heads=args.heads,
    )  # fmt: skip
    check_text("the prompt", args.prompt)
    if args.max_memory is not None:
        from circuits.attribution.estimate import parse_size

        options.max_memory = parse_size(args.max_memory)
    from circuits.features import features_for, load_features, scan_dir

    scan = scan_dir(args.features) if args.features else None  # before any loading
    model, clt = load_pair(args.model, args.transcoder, args.device, args.dtype)
    if args.estimate:
        from circuits.attribution.estimate import check_memory
        from circuits.pipeline import estimate_trace

        est = estimate_trace(args.prompt, model, clt, options)
        print(est.line())
        check_memory(est, options.max_memory)
        return
    features = load_features(scan, clt) if scan else features_for(args.transcoder, clt)
    result = trace(args.prompt, model, clt, options, features)
    meta = result.data["metadata"]
    print(f"{result.graph.n_features} feature nodes; targets {result.graph.target_names}")
    print(f"replacement score {meta['replacement_score']:.3f}, completeness score {meta['completeness_score']:.3f}")
    if result.validation is not None:
        print("\n".join(result.validation.lines()))
    print(result.json_path)
    print(result.graph_path)
    print(result.page_path)


def _cmd_qk(args: argparse.Namespace) -> None:
    from circuits.attribution.qk import qk_attribution
    from circuits.fileio import write_json
    from circuits.models import prompt_tokens
    from circuits.pipeline import load_pair

    model, clt = load_pair(args.model, args.transcoder, args.device, args.dtype)
    qk = qk_attribution(model, clt, args.prompt, args.layer, args.head, args.query, args.key)
    words = [model.tokenizer.decode([t]) for t in prompt_tokens(model, args.prompt)[0].tolist()]
    print(
        f"layer {qk.layer} head {qk.head}: query {qk.query} {words[qk.query]!r} -> key {qk.key} {words[qk.key]!r}, "
        f"score {qk.score:.4f} = the sum of {qk.terms.numel()} terms ({qk.terms.sum().item():.4f})"
    )
    for query, key, value in qk.top(args.top):
        print(f"  {value:+9.4f}  {query:>20} x {key}")
    if args.json:
        write_json(Path(args.json), qk.to_dict())
        print(args.json)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from circuits.aggregate import recurring_features, render_aggregate_page, scan_for
    from circuits.attribution.graph import Graph, aggregate
    from circuits.fileio import atomic_file, write_json

    check_output(args.out, directory=False)
    page_path = Path(args.page) if args.page else Path(args.out).with_suffix(".html")
    check_output(page_path, "--page", directory=False)
    graphs = [Graph.load(path) for path in args.graphs]
    merged = aggregate(graphs, args.min_prompts)
    recurrence = recurring_features(graphs, args.node_threshold, args.edge_threshold, args.min_prompts)
    page = render_aggregate_page(recurrence, scan_for(recurrence["transcoder"], args.features))
    write_json(args.out, merged)
    with atomic_file(page_path) as f:
        f.write(page)
    print(f"{len(merged['nodes'])} feature nodes, {len(merged['links'])} links from {len(args.graphs)} graphs")
    print(f"page: {len(recurrence['nodes'])} nodes kept by the pruned graphs, {len(recurrence['links'])} links")
    print(args.out)
    print(page_path)


def _cmd_train(args: argparse.Namespace) -> None:
    from circuits.train.checkpoint import checkpoint_step
    from circuits.train.config import load_recipe

    cfg = load_recipe(args.recipe)
    out = check_output(args.out or Path("runs") / args.recipe.stem)
    from circuits.train.loop import Interrupted, train  # TransformerLens: only once the recipe is known to be good

    main_rank = os.environ.get("RANK", "0") == "0"
    if args.resume and main_rank:
        print(f"resuming from step {checkpoint_step(out / 'checkpoint')} of {cfg.steps}", file=sys.stderr)
    try:
        metrics = train(cfg, out, resume=args.resume)
    except Interrupted as e:
        if main_rank:
            print(e, file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    if not metrics:  # a torchrun rank other than 0
        return
    L = len(metrics["nmse"])
    line = f"nmse {sum(metrics['nmse']) / L:.4f}  l0 {sum(metrics['l0']) / L:.1f}  dead {metrics['dead_fraction']:.3f}"
    if "kl" in metrics:  # a store run without a model has no replacement-model metrics
        line += f"  kl {metrics['kl']:.4f}  top1 {metrics['top1_agreement']:.3f}"
    print(line)
    print(out)


def _cmd_activations(args: argparse.Namespace) -> None:
    from circuits.train.config import load_recipe
    from circuits.train.store_writer import write_store

    cfg = load_recipe(args.recipe)
    manifest = write_store(cfg, args.out, args.tokens or cfg.steps * cfg.batch_tokens, args.dtype)
    if os.environ.get("RANK", "0") == "0":
        print(manifest.parent)


def _cmd_concepts(args: argparse.Namespace) -> None:
    from circuits.concepts.page import write_concepts_page
    from circuits.concepts.report import concept_report

    for text in [args.prompt, args.counterfactual or "", *args.concept, *args.path]:
        check_text("the prompt, a concept, a path or the counterfactual", text)
    check_output(Path(args.out))
    categories = _categories(args)
    model, nodes = _graph_nodes(args)
    report = concept_report(
        model,
        args.prompt,
        concepts=args.concept,
        paths=[p.split(",") for p in args.path],
        counterfactual=args.counterfactual,
        auto=args.auto,
        full_sequence=args.full_sequence,
        categories=categories,
        graph_nodes=nodes,
        three_d=args.three_d,
    )
    for p in report.paths:
        print(f"path {' -> '.join(p.path)}: score {p.score:.3f} (baseline {p.baseline:.3f}), peaks {p.peaks}")
    print(write_concepts_page(report, Path(args.out)))


def _cmd_compare(args: argparse.Namespace) -> None:
    from circuits.concepts.compare import compare_models
    from circuits.concepts.compare_page import write_compare_page
    from circuits.concepts.variants import answer_groups, category_variants, slot_swaps
    from circuits.models import load_model

    names = args.model or ["demo"]
    if len(set(names)) != len(names):
        raise CircuitsError(f"--model {names}: name each model once")
    categories = _categories(argparse.Namespace(**{**vars(args), "model": names[0]})) or {}
    models = {name: load_model(name, device=args.device, dtype=args.dtype) for name in names}
    prompts = args.prompts or [DEFAULT_PROMPT]
    if len(prompts) == 1:  # one prompt: its variants, grouped by the first model's answers
        first = models[names[0]]
        variants = category_variants(first, prompts[0], categories) or slot_swaps(first, prompts[0])
        prompts = answer_groups(first, prompts[0], variants, args.max_prompts)
    views = compare_models(models, prompts, split_answer=args.split)
    for v in views:
        print(f"{v.name}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.summary().items()))
    print(write_compare_page(views, Path(args.out)))


def _model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype: the options of every command that loads a model."""
    p.add_argument(
        "--model",
        default="demo",
        help="'demo', 'demo-tuned', a model dir or HF snapshot dir, or a TransformerLens name",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="the weights of the model and the transcoder (attribution computes in float32)",
    )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not the usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"circuits: error: {message} (see `{self.prog} --help`)\n")


def _group_options(p: argparse.ArgumentParser) -> None:
    """--group and --vocabulary: named word groups for @NAME concepts and counterfactual swaps."""
    p.add_argument(
        "--group", action="append", default=[], metavar="NAME=w1|w2",
        help="a named word group: @NAME as a concept, and its members swapped for counterfactuals; repeatable",
    )  # fmt: skip
    p.add_argument(
        "--vocabulary", help="a file of named groups: a JSON object of word lists, or NAME=w1|w2 lines "
        "(default with neither, --model demo: the demo world's @cities, @states, @capitals)",
    )  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="circuits", description="Sparse-feature circuit tracing for transformers.")
    parser.add_argument("--version", action="version", version=f"circuits {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="print the model's top next-token predictions for a prompt")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("features", help="scan a corpus with a transcoder: top contexts, histograms, logits, labels")
    _model_options(p)
    p.add_argument("--clt", default="demo", help="a transcoder, as --transcoder of `circuits trace`")
    p.add_argument("--text", help="corpus: 'demo' (default), a .txt/.jsonl file or 'hf:DATASET'")
    p.add_argument("--documents", type=int, help="documents to scan (default 2048)")
    p.add_argument("--top-k", type=int, help="top contexts kept per feature (default 8)")
    p.add_argument(
        "--out", help="output directory (default: CLT_DIR/features for a directory, else a folder of the user cache, "
        "~/.cache/circuits/features/NAME)"
    )  # fmt: skip
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser("trace", help="attribution graph of a prompt: JSON, safetensors and the HTML page")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument(
        "--transcoder", default="demo",
        help="'demo', 'demo-tuned', a preset (gemma, llama, clt-gemma-2-2b-426k, ...), hf:ORG/REPO[/FOLDER][@REV], "
        "saelens:RELEASE:ID, or a directory of any published layout",
    )  # fmt: skip
    p.add_argument("--out", default="traces", help="output directory (graphs/ holds the committed gallery)")
    p.add_argument("--slug", default=None, help="file name stem (default: from the prompt)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative influence of kept nodes")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative influence of kept edges")
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        default=8192,
        help="keep only this many feature nodes, the most influential (default 8192: bounds memory)",
    )
    p.add_argument(
        "--inhibited", type=int, default=5, help="list this many inactive features the graph suppresses most"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="targets per backward pass (default: as many as 16 MB of gradients hold)",
    )
    p.add_argument(
        "--target", nargs="+", default=None, metavar="TOKEN", help="target tokens, or A-B for a logit difference"
    )
    p.add_argument(
        "--estimate", action="store_true", help="print the predicted peak memory and time; attribute nothing"
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="refuse a prompt predicted to need more, e.g. 8GB (default: the memory available)",
    )
    p.add_argument("--no-prune", action="store_true", help="JSON of the full graph: every node and nonzero edge")
    p.add_argument("--validate", action="store_true", help="ablate the top features and compare with the graph")
    p.add_argument("--features", help="feature scan for the cards (default: the transcoder's, see `circuits features`)")
    p.add_argument("--concept", action="append", default=[], help="a concept to trace beside the graph; repeatable")
    p.add_argument("--path", action="append", default=[], help="a concept chain to score, e.g. Dallas,Texas,Austin")
    p.add_argument("--no-concepts", action="store_true", help="no concept-trace panels on the page")
    p.add_argument("--heads", action="store_true", help="add each link's head loadings per attention layer to the JSON")
    _group_options(p)
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("qk", help="QK attribution: why a head attends from a query position to a key position")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--transcoder", default="demo", help="a transcoder, as --transcoder of `circuits trace`")
    p.add_argument("--layer", type=int, required=True, help="the attention layer")
    p.add_argument("--head", type=int, required=True, help="the head (a query head with grouped-query attention)")
    p.add_argument("--query", type=int, default=-1, help="the query position (negative: from the end; default -1)")
    p.add_argument("--key", type=int, required=True, help="the key position (<= the query)")
    p.add_argument("--top", type=int, default=20, help="print this many terms, largest |value| first")
    p.add_argument("--json", help="write every term to this JSON file")
    p.set_defaults(func=_cmd_qk)

    p = sub.add_parser(
        "aggregate", help="merge the graphs of many prompts into one graph of features, and a page of those that recur"
    )
    p.add_argument("graphs", nargs="+", help=".graph.safetensors files written by `circuits trace`")
    p.add_argument("--out", default="traces/aggregate.json")
    p.add_argument("--min-prompts", type=int, default=1, help="keep nodes and links seen in at least this many")
    p.add_argument("--page", help="the page of the recurring features (default: --out with .html)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="the page's pruning of each graph, as trace")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="the page's pruning of each graph, as trace")
    p.add_argument("--features", help="feature scan for the page's cards (default: the graphs' transcoder's)")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("train", help="train a cross-layer transcoder from a TOML recipe (see training/)")
    p.add_argument("recipe", type=Path, help="a TOML file of TrainConfig keys, e.g. training/demo.toml")
    p.add_argument("--out", type=Path, help="output directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("activations", help="write a recipe's activations to a store that `circuits train` reads")
    p.add_argument("recipe", type=Path, help="a TOML recipe: its model, text, hooks, docs_per_chunk, eval_docs")
    p.add_argument("--out", type=Path, required=True, help="the store's directory")
    p.add_argument("--tokens", type=int, help="training tokens to store (default: the recipe's steps x batch_tokens)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.set_defaults(func=_cmd_activations)

    p = sub.add_parser("concepts", help="trace concepts through layers and positions; write an HTML page + JSON")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument(
        "--concept", action="append", default=[],
        help="a word, NAME=w1|w2 (a group), or @NAME (a --group or --vocabulary group; --model demo: @cities, "
        "@states, @capitals); repeatable",
    )  # fmt: skip
    p.add_argument("--path", action="append", default=[], help="a comma-separated chain, e.g. Dallas,Texas,Austin")
    p.add_argument("--auto", action="store_true", help="also trace the proposed intermediate concept")
    p.add_argument(
        "--counterfactual",
        help="a prompt of the same token length for patching (default: a swap within a group, or else of a "
        "traced prompt word for one the model ranks high in that slot, that changes the answer)",
    )
    p.add_argument(
        "--full-sequence", action="store_true",
        help="score every multi-token word by its whole token sequence (default: only words whose first token "
        "is shared with another traced word or blank)",
    )  # fmt: skip
    p.add_argument(
        "--transcoder", help="also attribute the prompt with this transcoder (as `circuits trace`) and show "
        "the graph's nodes at each trace cell",
    )  # fmt: skip
    _group_options(p)
    p.add_argument(
        "--3d", dest="three_d", action="store_true", help="trajectories in 3 principal components, rotatable"
    )
    p.add_argument("--out", default="concepts_out", help="output directory")
    p.set_defaults(func=_cmd_concepts)

    p = sub.add_parser("compare", help="compare models' trajectories, funnels and thinking styles on the same prompts")
    p.add_argument("prompts", nargs="*", help=f"prompts (default {DEFAULT_PROMPT!r}); one: it and its variants")
    p.add_argument("--model", action="append", help="a model (as for `circuits predict`); pass two or more")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-prompts", type=int, default=24, help="variants of a single prompt: at most this many")
    p.add_argument(
        "--split", metavar="ANSWER",
        help="follow the prompts any model answers with ANSWER (e.g. a refusal's first word) against the rest",
    )  # fmt: skip
    _group_options(p)
    p.add_argument("--out", default="compare_out", help="output directory")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="report the shipped demo model's accuracy on its facts")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except CircuitsError as e:
        print(f"circuits: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk or the system refused a read or write (full, read-only, too large)
        where = f" ({e.filename})" if e.filename else ""
        print(f"circuits: error: {e.strerror or e}{where}: free space or choose another place", file=sys.stderr)
        return 2
    return 0
