"""Render the gallery: one page per demo prompt into graphs/, an index.html linking them, and a
screenshot of each page (graphs/screenshots/, when Chromium is installed).

    python scripts/build_gallery.py [--transcoder demo] [--out graphs]

Each page is what `circuits trace` writes (graph, feature cards, supernodes, concept traces,
validation); the full-graph .safetensors files are not kept (they are large and re-made by
`circuits trace`). Deterministic for a given model and transcoder.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from circuits.demo.facts import CATEGORIES
from circuits.features import features_for
from circuits.fileio import atomic_file
from circuits.page.browser import find_chromium, offline_browser
from circuits.pipeline import TraceOptions, load_pair, trace


@dataclass
class Example:
    slug: str
    kind: str
    prompt: str
    path: list[str]
    note: str
    targets: list[str] = field(default_factory=list)
    counterfactual: str | None = None


EXAMPLES = [
    Example("dallas-two-hop", "two-hop", "Fact: Dallas is in the state whose capital is", ["Dallas", "Texas", "Austin"],
            "The flagship: the city must be mapped to its state before the capital can be read out."),
    Example("san-antonio-held-out", "held-out composition", "Fact: San Antonio is in the state whose capital is",
            ["San Antonio", "Texas", "Austin"],
            "San Antonio never appears in a two-hop sentence: the model composes its one-hop facts."),
    Example("san-diego-held-out", "held-out composition", "Fact: San Diego is in the state whose capital is",
            ["San Diego", "California", "Sacramento"], "Held-out composition for another state."),
    Example("texas-capital-one-hop", "one-hop", "The capital of Texas is", ["Texas", "Austin"],
            "One hop: state to capital."),
    Example("dallas-state-one-hop", "one-hop", "Dallas is a city in", ["Dallas", "Texas"], "One hop: city to state."),
    Example("dallas-vs-los-angeles", "counterfactual", "Fact: Dallas is in the state whose capital is",
            ["Dallas", "Texas", "Austin"],
            "Target: the logit difference Austin − Sacramento; patching against the Los Angeles prompt.",
            targets=["Austin-Sacramento"], counterfactual="Fact: Los Angeles is in the state whose capital is"),
]  # fmt: skip


def build(example: Example, model, clt, transcoder: str, features, out: Path, work: Path) -> dict:
    options = TraceOptions(
        out=work, slug=example.slug, model_name="demo", transcoder_name=transcoder, targets=example.targets,
        validate=True, paths=[example.path], counterfactual=example.counterfactual, categories=CATEGORIES,
    )  # fmt: skip
    result = trace(example.prompt, model, clt, options, features)
    for source in (result.json_path, result.page_path):
        shutil.copy(source, out / source.name)
    meta = result.data["metadata"]
    return {
        "example": example,
        "targets": list(zip(result.graph.target_names, result.graph.target_probs.tolist(), strict=True)),
        "replacement": meta["replacement_score"],
        "completeness": meta["completeness_score"],
        "validation": result.validation.corr_frozen,
        "size_mb": result.page_path.stat().st_size / 2**20,
    }


def index_html(rows: list[dict], transcoder: str) -> str:
    body = []
    for r in rows:
        e = r["example"]
        targets = ", ".join(f"{t} {p:.3f}" for t, p in r["targets"])
        shot = f'<img src="screenshots/{e.slug}.png" alt="">' if r.get("screenshot") else ""
        body.append(
            f'<tr><td><a href="{e.slug}.html">{html.escape(e.prompt)}</a><div class=note>{html.escape(e.note)}</div>'
            f"</td><td>{html.escape(e.kind)}</td><td>{html.escape(' → '.join(e.path))}</td><td>{html.escape(targets)}"
            f"</td><td>{r['replacement']:.3f} / {r['completeness']:.3f}</td><td>{r['validation']:.3f}</td>"
            f'<td>{r["size_mb"]:.1f} MB</td><td><a href="{e.slug}.html">{shot or "open"}</a></td></tr>'
        )
    style = (
        "body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:top}"
        ".note{color:#666;font-size:12px;max-width:420px}img{width:320px;border:1px solid #ccc}"
    )
    head = "<tr><th>prompt</th><th>kind</th><th>concept path</th><th>targets</th><th>replacement / completeness</th>"
    head += "<th>validation r</th><th>page</th><th>screenshot</th></tr>"
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>circuits gallery</title><style>{style}</style>"
        f"</head><body><h1>circuits: attribution graphs of the demo model</h1><p>Demo model, transcoder "
        f"{html.escape(transcoder)}. Each page is one self-contained offline file (graph, feature cards, "
        f"supernodes, concept traces); rebuild with <code>python scripts/build_gallery.py</code>.</p>"
        f"<table>{head}{''.join(body)}</table></body></html>\n"
    )


def screenshot(open_page, page: Path, target: Path) -> None:
    """The page with its most influential feature's panel open."""
    opened = open_page(page)
    opened.page.wait_for_function("window.circuitsPage && window.circuitsPage.ready")
    opened.page.evaluate(
        """() => { const f = nodes.get({filter: (n) => n.kind === 'feature'});
        f.sort((a, b) => a.influence - b.influence); if (f.length) circuitsPage.select(f[0].id); }"""
    )
    opened.page.wait_for_timeout(500)  # the concept charts finish drawing
    if opened.errors or opened.blocked or opened.dialogs:
        raise RuntimeError(
            f"{page}: errors {opened.errors[:3]}, requests {opened.blocked[:3]}, dialogs {opened.dialogs}"
        )
    opened.page.screenshot(path=str(target))
    opened.page.context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transcoder", default="demo")
    parser.add_argument("--out", default="graphs")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "screenshots").mkdir(parents=True, exist_ok=True)
    model, clt = load_pair("demo", args.transcoder)
    features = features_for(args.transcoder, clt)
    with tempfile.TemporaryDirectory() as work:
        rows = [build(e, model, clt, args.transcoder, features, out, Path(work)) for e in EXAMPLES]
    if find_chromium():
        with offline_browser() as open_page:
            for r in rows:
                slug = r["example"].slug
                screenshot(open_page, out / f"{slug}.html", out / "screenshots" / f"{slug}.png")
                r["screenshot"] = True
    with atomic_file(out / "index.html") as f:
        f.write(index_html(rows, args.transcoder))
    sizes = {r["example"].slug: round(r["size_mb"], 2) for r in rows}
    print(json.dumps({"pages": sizes, "total_mb": round(sum(sizes.values()), 2)}, indent=2))
    print(out / "index.html")


if __name__ == "__main__":
    main()
