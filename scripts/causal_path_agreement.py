"""How often the causal path score agrees with the logit-lens path score on the demo's 150 two-hop prompts.

For each prompt ("Fact: Dallas is in the state whose capital is"), every path city -> state -> capital
(50 states) is scored by the logit lens and causally (patching the residual stream at each hop's peak
cell into a run on another state's city, the first same-category swap that changes the answer).

    python scripts/causal_path_agreement.py [--limit N]
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from circuits.concepts.lens import logit_lens, make_concept, trace_concept
from circuits.concepts.patching import patching_grid
from circuits.concepts.paths import rank_paths
from circuits.concepts.variants import propose_counterfactuals
from circuits.demo.corpus import TWO_HOP_PROMPT
from circuits.demo.facts import CATEGORIES, STATE_OF_CITY, STATES
from circuits.demo.two_hop import two_hop_cases
from circuits.models import load_model, prompt_tokens


def one_prompt(model, city: str) -> dict:
    prompt = TWO_HOP_PROMPT.format(city=city)
    tokens = prompt_tokens(model, prompt)
    lens, cache = logit_lens(model, tokens)
    names = [city, *(s.name for s in STATES), *(s.capital for s in STATES)]
    traces = {n: trace_concept(model, tokens, lens, cache, make_concept(model, n)) for n in names}
    counterfactual = propose_counterfactuals(model, prompt, CATEGORIES, n=1)[0]
    patching = patching_grid(model, prompt, counterfactual, kinds=("resid_pre",))
    paths = rank_paths(traces, [[city, s.name, s.capital] for s in STATES], model.cfg.n_layers, patching)
    state = STATE_OF_CITY[city].name
    true = next(p for p in paths if p.path[1] == state)
    by_causal = max(paths, key=lambda p: p.causal_score)
    return {
        "lens_top_true": paths[0].path[1] == state,
        "causal_top_true": by_causal.path[1] == state,
        "same_top": paths[0].path == by_causal.path,
        "hops_agree": true.agrees,
        "recoveries": true.recoveries,
        "state_peak": true.peaks[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    cases = two_hop_cases()[: args.limit]
    rows = [one_prompt(model, city) for city, _ in tqdm(cases, desc="prompts")]
    n = len(rows)
    print(f"prompts: {n}")
    for key in ("lens_top_true", "causal_top_true", "same_top"):
        print(f"{key:>28}: {sum(r[key] for r in rows) / n:.3f}")
    for i, hop in enumerate(("city", "state", "capital")):
        agree = sum(r["hops_agree"][i] for r in rows) / n
        recovery = sum(r["recoveries"][i] for r in rows) / n
        print(f"{hop:>8} hop: lens and patching agree {agree:.3f}; mean recovery at its peak {recovery:+.3f}")
    all_agree = sum(all(r["hops_agree"]) for r in rows) / n
    print(f"true path, every hop agrees: {all_agree:.3f}")
    peaks: dict[tuple[int, int], int] = {}
    for r in rows:
        peaks[r["state_peak"]] = peaks.get(r["state_peak"], 0) + 1
    print(f"state peak cells: {sorted(peaks.items(), key=lambda kv: -kv[1])[:4]}")


if __name__ == "__main__":
    main()
