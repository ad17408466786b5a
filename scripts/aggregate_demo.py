"""The demo's global circuit: trace ten two-hop prompts, aggregate them as `circuits aggregate` does, and
screenshot the page with its most frequent feature clicked (graphs/screenshots/aggregate-demo.png).

    python scripts/aggregate_demo.py [--out traces/aggregate-demo] [--screenshot graphs/screenshots/aggregate-demo.png]

Writes the traces' files, `aggregate.json` and `aggregate.html` into --out and prints every file written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from circuits.cli import main as circuits
from circuits.features import features_for
from circuits.page.browser import offline_browser
from circuits.pipeline import TraceOptions, load_pair, trace

CITIES = ("Dallas", "Houston", "San Antonio", "Chicago", "Peoria", "Sacramento", "Los Angeles", "San Diego",
          "Denver", "Boulder")  # fmt: skip


def screenshot(page: Path, target: Path) -> None:
    """The page with its most frequent feature (the most influential among equals) clicked."""
    with offline_browser() as open_page:
        opened = open_page(page)
        opened.page.wait_for_function("window.circuitsPage && window.circuitsPage.ready")
        opened.page.evaluate(
            """() => { const data = JSON.parse(document.getElementById('circuits-recurrence').textContent);
            const f = nodes.get({filter: (n) => n.kind === 'feature'}).map((n) => [n.id, data.nodes[n.id]]);
            f.sort((a, b) => b[1].prompts.length - a[1].prompts.length || b[1].mean_influence - a[1].mean_influence);
            circuitsPage.select(f[0][0]); }"""
        )
        opened.page.wait_for_timeout(300)
        if opened.errors or opened.blocked:
            raise RuntimeError(f"{page}: errors {opened.errors[:3]}, requests {opened.blocked[:3]}")
        opened.page.screenshot(path=str(target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("traces/aggregate-demo"))
    parser.add_argument("--screenshot", type=Path, default=Path("graphs/screenshots/aggregate-demo.png"))
    args = parser.parse_args()
    model, clt = load_pair("demo", "demo")
    features = features_for("demo", clt)
    graphs = []
    for city in CITIES:
        options = TraceOptions(out=args.out, concept_traces=False)
        result = trace(f"Fact: {city} is in the state whose capital is", model, clt, options, features)
        graphs.append(str(result.graph_path))
        print(result.json_path, result.graph_path, result.page_path, sep="\n")
    if circuits(["aggregate", *graphs, "--out", str(args.out / "aggregate.json")]) != 0:
        raise SystemExit("circuits aggregate failed")
    screenshot(args.out / "aggregate.html", args.screenshot)
    print(args.screenshot)


if __name__ == "__main__":
    main()
