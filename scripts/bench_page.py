"""Benchmark: how fast a large page renders and becomes interactive in headless Chromium.

Builds a random graph in the circuit-tracer schema (default 5,000 nodes and 50,000 edges over 40
positions and 4 layers, every edge shown: --top-k 0), writes the page, opens it offline and reports:
  network_built_ms    navigation start -> vis-network built (HTML parsed, data loaded, network created)
  first_draw_ms       navigation start -> the network's first complete canvas drawing
  interactive_ms      navigation start -> every handler wired and the graph drawn (`circuitsPage.ready`)
  panel_ms            pointer down on a node -> its side panel filled (in-page time)
  click_round_trip_ms Playwright's click -> the panel seen filled (includes the canvas redraws)
  slider_ms           edge threshold to 50% -> half the edges hidden (JS time, redraw excluded)
  paths_ms            the 5 strongest paths from the first logit down to the tokens (JS time)
  search_ms           a search matching about a tenth of the nodes, highlighted and listed (JS time)
with the same numbers for a small reference page (the demo-sized graph: 60 nodes, 500 edges) in
the same run, and the ratios.

    python scripts/bench_page.py [--nodes 5000] [--edges 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from circuits.page.assemble import PageOptions, write_page
from circuits.page.browser import offline_browser
from circuits.page.graph_view import ViewOptions


def random_graph(n_nodes: int, n_edges: int, n_pos: int = 40, n_layers: int = 4, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tokens = ["<bos>"] + [f"w{p}" for p in range(1, n_pos)]
    nodes = [{"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding"}
             for p in range(n_pos)]  # fmt: skip
    nodes += [{"node_id": f"{n_layers + 1}_{k}_{n_pos - 1}", "feature": k, "layer": str(n_layers + 1),
               "ctx_idx": n_pos - 1, "feature_type": "logit", "token_prob": 0.1, "clerp": f'Output "t{k}" (p=0.100)'}
              for k in range(5)]  # fmt: skip
    seen = set()
    while len(nodes) < n_nodes:
        layer, pos, feature = rng.randrange(n_layers), rng.randrange(n_pos), rng.randrange(20_000)
        if (layer, pos, feature) not in seen:
            seen.add((layer, pos, feature))
            nodes.append({"node_id": f"{layer}_{feature}_{pos}", "feature": 0, "layer": str(layer), "ctx_idx": pos,
                          "feature_type": "cross layer transcoder", "activation": rng.uniform(0.1, 5),
                          "influence": rng.random()})  # fmt: skip

    def row(n):
        return 0 if n["layer"] == "E" else int(n["layer"]) + 1

    links, pairs = [], set()
    while len(links) < n_edges:
        s, t = rng.choice(nodes), rng.choice(nodes)
        if row(t) > row(s) and t["ctx_idx"] >= s["ctx_idx"] and (s["node_id"], t["node_id"]) not in pairs:
            pairs.add((s["node_id"], t["node_id"]))
            links.append({"source": s["node_id"], "target": t["node_id"], "weight": rng.gauss(0, 1)})
    metadata = {"slug": "bench", "prompt": " ".join(tokens[1:]), "prompt_tokens": tokens}
    return {"metadata": metadata, "qParams": {"supernodes": []}, "nodes": nodes, "links": links}


def measure(open_page, path: Path, node_id: str) -> dict:
    opened = open_page(path)
    page = opened.page
    page.wait_for_function("window.circuitsPage && window.circuitsPage.ready && window.circuitsPage.firstDrawn",
                           timeout=120_000)  # fmt: skip
    script, ready, first_draw = page.evaluate("[circuitsPage.started, circuitsPage.readyAt, circuitsPage.firstDrawn]")
    page.evaluate(
        """() => document.querySelector('#mynetwork canvas').addEventListener('pointerdown',
        () => { window.pointerDownAt = performance.now(); }, {capture: true})"""
    )
    x, y = page.evaluate(
        """(id) => { const p = network.canvasToDOM(network.getPositions([id])[id]);
        const r = document.querySelector('#mynetwork canvas').getBoundingClientRect();
        return [r.left + p.x, r.top + p.y]; }""",
        node_id,
    )
    start = time.perf_counter()
    page.mouse.click(x, y)
    page.wait_for_function("(id) => document.getElementById('details').dataset.node === id", arg=node_id)
    click = (time.perf_counter() - start) * 1000
    panel = page.evaluate("circuitsPage.detailsAt - window.pointerDownAt")
    slider = page.evaluate(
        "() => { const t = performance.now(); circuitsPage.setThreshold(0.5); return performance.now() - t; }"
    )
    paths = page.evaluate(
        """() => { const id = nodes.get({filter: (n) => n.kind === 'logit'})[0].id; const t = performance.now();
        circuitsPage.topPaths(id); return performance.now() - t; }"""
    )
    search = page.evaluate(
        "() => { const t = performance.now(); circuitsPage.search('_1'); return performance.now() - t; }"
    )
    if opened.errors or opened.blocked:
        raise RuntimeError(f"the page logged errors {opened.errors[:3]} or made requests {opened.blocked[:3]}")
    page.context.close()
    return {
        "network_built_ms": script,
        "interactive_ms": ready,
        "first_draw_ms": first_draw,
        "panel_ms": panel,
        "click_round_trip_ms": click,
        "slider_ms": slider,
        "paths_ms": paths,
        "search_ms": search,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--edges", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    options = PageOptions(view=ViewOptions(top_k_edges=None))
    results = {}
    with tempfile.TemporaryDirectory() as tmp, offline_browser() as open_page:
        for name, (n, e) in {"reference": (60, 500), "large": (args.nodes, args.edges)}.items():
            graph = random_graph(n, e)
            start = time.perf_counter()
            path = write_page(Path(tmp) / f"{name}.html", graph, options=options)
            build = time.perf_counter() - start
            target = next(
                node["node_id"] for node in graph["nodes"] if node["feature_type"] == "cross layer transcoder"
            )
            runs = [measure(open_page, path, target) for _ in range(args.repeat)]
            results[name] = {
                "nodes": n,
                "edges": e,
                "page_mb": round(path.stat().st_size / 2**20, 2),
                "build_s": round(build, 2),
                **{k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]},
            }
    ref, large = results["reference"], results["large"]
    results["ratio_large_to_reference"] = {k: round(large[k] / ref[k], 2) for k in ("interactive_ms", "first_draw_ms")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
