"""The attention story of a prompt: which heads carry a word's information to the last position (head
loadings of the pruned graph's links), whether per-head activation patching agrees, and why those
heads look at the word (QK attributions). Defaults: the demo flagship and `Dallas`.

    python scripts/attention_story.py ["PROMPT"] [--word Dallas] [--top 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuits.attribution.attribute import attribute  # noqa: E402
from circuits.attribution.heads import head_loadings  # noqa: E402
from circuits.attribution.qk import qk_terms, residual_parts  # noqa: E402
from circuits.attribution.replacement import build_replacement  # noqa: E402
from circuits.concepts.patching import patching_grid, propose_counterfactuals  # noqa: E402
from circuits.demo.facts import CATEGORIES  # noqa: E402
from circuits.pipeline import load_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Fact: Dallas is in the state whose capital is")
    parser.add_argument("--word", default="Dallas")
    parser.add_argument("--top", type=int, default=3, help="QK terms shown per head")
    args = parser.parse_args()
    model, clt = load_pair("demo", "demo")
    graph = attribute(args.prompt, model, clt, progress=False)
    words = graph.token_strs
    at, last = words.index(args.word), graph.n_pos - 1
    result = graph.prune()
    edges = (result.edge_mask & (graph.adjacency != 0)).nonzero()
    source = graph.token_slice.start + at
    mine = edges[edges[:, 1] == source]
    loadings = head_loadings(graph, model, clt, mine)
    weight = graph.adjacency[mine[:, 0], mine[:, 1]]
    print(f"{len(mine)} kept links from {args.word!r} (position {at}), summed weight {weight.sum():.3f}")
    carried = loadings.heads.sum(0)  # [L, H]
    other = loadings.other.sum(0)
    for l in range(graph.n_layers):
        parts = "  ".join(f"H{h} {w:+.3f}" for h, w in enumerate(carried[l].tolist()))
        print(f"  layer {l}: {parts}  other {other[l]:+.3f}")
    counterfactual = propose_counterfactuals(model, args.prompt, CATEGORIES, n=1)[0]
    grid = patching_grid(model, args.prompt, counterfactual, kinds=("head",)).grids["head"]  # [L, H, pos]
    print(f"per-head patching against {counterfactual!r} (recovered fraction), at the last position and at {at}:")
    for l in range(graph.n_layers):
        cells = (f"H{h} {grid[l, h, last]:+.3f}/{grid[l, h, at]:+.3f}" for h in range(grid.shape[1]))
        print(f"  layer {l}: " + "  ".join(cells))
    rep = build_replacement(model, clt, graph.tokens)
    top = carried.flatten().abs().argsort(descending=True)[:2].tolist()
    H = carried.shape[1]
    for layer, head in (divmod(i, H) for i in top):
        parts = residual_parts(rep, layer)
        pattern = rep.patterns[layer, head, last]
        print(f"layer {layer} head {head}: attention from {words[last]!r} to {args.word!r} {pattern[at]:.3f}")
        scores = [qk_terms(model, rep, parts, layer, head, last, k) for k in range(last + 1)]
        print("  scores by key: " + "  ".join(f"{words[k]!r} {s.score:+.2f}" for k, s in enumerate(scores)))
        for q, k, v in scores[at].top(args.top):
            print(f"  {v:+.3f}  {q} x {k}")
        others = [by_kind(s) for k, s in enumerate(scores) if k != at]
        print(f"  by kind of source, at {args.word!r} against the mean over the other keys:")
        for pair, value in sorted(by_kind(scores[at]).items(), key=lambda kv: -abs(kv[1])):
            mean = sum(o.get(pair, 0.0) for o in others) / len(others)
            print(f"    {pair[0]:>8} x {pair[1]:<8} {value:+.3f}  (others {mean:+.3f})")


def kind(source: str) -> str:
    """token, position, bias, head, skip, error or feature: the kind of a QK source id."""
    head = source.split("_")[0]
    names = {"E": "token", "pos": "position", "bias": "bias", "head": "head", "skip": "skip"}
    return names.get(head, "error" if source.split("_")[1] == "-1" else "feature")


def by_kind(qk) -> dict[tuple[str, str], float]:
    """The terms of a QK attribution summed by (query source kind, key source kind)."""
    out: dict[tuple[str, str], float] = {}
    for i, q in enumerate(qk.query_sources):
        for j, k in enumerate(qk.key_sources):
            pair = (kind(q), kind(k))
            out[pair] = out.get(pair, 0.0) + qk.terms[i, j].item()
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
