"""The `circuits` command: a thin layer over the Python API.

Every subcommand is a function `_cmd_NAME(args)` registered in `_build_parser`. Known errors
(`CircuitsError`) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from circuits import __version__
from circuits.errors import CircuitsError

DEFAULT_PROMPT = "Fact: Dallas is in the state whose capital is"


def _demo_categories(model: str) -> dict[str, list[str]] | None:
    """The word categories the concepts stage can propose from: the demo world's for the demo model
    (its states, capitals and cities), none for any other model."""
    from circuits.demo.facts import CATEGORIES

    return CATEGORIES if model == "demo" else None


def _cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from circuits.models import load_model, prompt_tokens

    model = load_model(args.model, device=args.device, dtype=args.dtype)
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

    model, clt = load_pair(args.model, args.clt, args.device, args.dtype)
    given = {"text": args.text, "n_documents": args.documents, "top_k": args.top_k}
    cfg = FeatureScanConfig(**{k: v for k, v in given.items() if v is not None})
    out = Path(args.out) if args.out else default_features_dir(args.clt)
    scan_features(model, clt, cfg, clt_name=str(args.clt)).save(out)
    print(out)


def _cmd_trace(args: argparse.Namespace) -> None:
    from circuits.features import features_for, load_features
    from circuits.pipeline import TraceOptions, load_pair, trace

    options = TraceOptions(
        out=Path(args.out), slug=args.slug, model_name=args.model, transcoder_name=args.transcoder,
        targets=args.target or [], batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes,
        inhibited=args.inhibited, device=args.device, node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold, prune=not args.no_prune, validate=args.validate,
        concept_traces=not args.no_concepts, concepts=args.concept, paths=[p.split(",") for p in args.path],
        categories=_demo_categories(args.model),
    )  # fmt: skip
    if args.max_memory is not None:
        from circuits.attribution.estimate import parse_size

        options.max_memory = parse_size(args.max_memory)
    model, clt = load_pair(args.model, args.transcoder, args.device, args.dtype)
    if args.estimate:
        from circuits.attribution.estimate import check_memory
        from circuits.pipeline import estimate_trace

        est = estimate_trace(args.prompt, model, clt, options)
        print(est.line())
        check_memory(est, options.max_memory)
        return
    features = load_features(args.features, clt) if args.features else features_for(args.transcoder, clt)
    result = trace(args.prompt, model, clt, options, features)
    meta = result.data["metadata"]
    print(f"{result.graph.n_features} feature nodes; targets {result.graph.target_names}")
    print(f"replacement score {meta['replacement_score']:.3f}, completeness score {meta['completeness_score']:.3f}")
    if result.validation is not None:
        print("\n".join(result.validation.lines()))
    print(result.json_path)
    print(result.page_path)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from circuits.attribution.graph import Graph, aggregate
    from circuits.fileio import write_json

    merged = aggregate([Graph.load(path) for path in args.graphs], args.min_prompts)
    write_json(args.out, merged)
    print(f"{len(merged['nodes'])} feature nodes, {len(merged['links'])} links from {len(args.graphs)} graphs")
    print(args.out)


def _cmd_train(args: argparse.Namespace) -> None:
    from circuits.train.config import load_recipe
    from circuits.train.loop import train

    cfg = load_recipe(args.recipe)
    out = args.out or Path("runs") / args.recipe.stem
    metrics = train(cfg, out, resume=args.resume)
    if not metrics:  # a torchrun rank other than 0
        return
    L = len(metrics["nmse"])
    print(
        f"nmse {sum(metrics['nmse']) / L:.4f}  l0 {sum(metrics['l0']) / L:.1f}  dead {metrics['dead_fraction']:.3f}  "
        f"kl {metrics['kl']:.4f}  top1 {metrics['top1_agreement']:.3f}"
    )
    print(out)


def _cmd_concepts(args: argparse.Namespace) -> None:
    from circuits.concepts.page import write_concepts_page
    from circuits.concepts.report import concept_report
    from circuits.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    report = concept_report(
        model,
        args.prompt,
        concepts=args.concept,
        paths=[p.split(",") for p in args.path],
        counterfactual=args.counterfactual,
        auto=args.auto,
        full_sequence=args.full_sequence,
        categories=_demo_categories(args.model),
    )
    for p in report.paths:
        print(f"path {' -> '.join(p.path)}: score {p.score:.3f} (baseline {p.baseline:.3f}), peaks {p.peaks}")
    print(write_concepts_page(report, Path(args.out)))


def _model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype: the options of every command that loads a model."""
    p.add_argument("--model", default="demo", help="'demo', a model dir or HF snapshot dir, or a TransformerLens name")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="the weights of the model and the transcoder (attribution computes in float32)",
    )  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuits", description="Sparse-feature circuit tracing for transformers.")
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
    p.add_argument("--out", help="output directory (default: circuits/demo/features, or CLT_DIR/features)")
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser("trace", help="attribution graph of a prompt: JSON, safetensors and the HTML page")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument(
        "--transcoder", default="demo",
        help="'demo', a preset (gemma, llama, clt-gemma-2-2b-426k, ...), hf:ORG/REPO[/FOLDER][@REV], "
        "saelens:RELEASE:ID, or a directory of any published layout",
    )  # fmt: skip
    p.add_argument("--out", default="graphs", help="output directory")
    p.add_argument("--slug", default=None, help="file name stem (default: from the prompt)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative influence of kept nodes")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative influence of kept edges")
    p.add_argument("--max-feature-nodes", type=int, default=8192,
                   help="keep only this many feature nodes, the most influential (default 8192: bounds memory)")
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
    p.add_argument("--estimate", action="store_true", help="print the predicted peak memory and time; attribute nothing")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse a prompt predicted to need more, e.g. 8GB (default: the memory available)")
    p.add_argument("--no-prune", action="store_true", help="JSON of the full graph: every node and nonzero edge")
    p.add_argument("--validate", action="store_true", help="ablate the top features and compare with the graph")
    p.add_argument("--features", help="feature scan for the cards (default: the transcoder's, see `circuits features`)")
    p.add_argument("--concept", action="append", default=[], help="a concept to trace beside the graph; repeatable")
    p.add_argument("--path", action="append", default=[], help="a concept chain to score, e.g. Dallas,Texas,Austin")
    p.add_argument("--no-concepts", action="store_true", help="no concept-trace panels on the page")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("aggregate", help="merge the graphs of many prompts into one graph of features")
    p.add_argument("graphs", nargs="+", help=".graph.safetensors files written by `circuits trace`")
    p.add_argument("--out", default="graphs/aggregate.json")
    p.add_argument("--min-prompts", type=int, default=1, help="keep nodes and links seen in at least this many")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("train", help="train a cross-layer transcoder from a TOML recipe (see training/)")
    p.add_argument("recipe", type=Path, help="a TOML file of TrainConfig keys, e.g. training/demo.toml")
    p.add_argument("--out", type=Path, help="output directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("concepts", help="trace concepts through layers and positions; write an HTML page + JSON")
    _model_options(p)
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument(
        "--concept", action="append", default=[],
        help="a word, NAME=w1|w2 (a group), or a category (--model demo: @cities, @states, @capitals); repeatable",
    )  # fmt: skip
    p.add_argument("--path", action="append", default=[], help="a comma-separated chain, e.g. Dallas,Texas,Austin")
    p.add_argument("--auto", action="store_true", help="also trace the proposed intermediate concept")
    p.add_argument(
        "--counterfactual",
        help="a prompt of the same token length for patching (default, --model demo: a same-category swap)",
    )
    p.add_argument("--full-sequence", action="store_true", help="score multi-token words by their whole sequence")
    p.add_argument("--out", default="concepts_out", help="output directory")
    p.set_defaults(func=_cmd_concepts)

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
    return 0
