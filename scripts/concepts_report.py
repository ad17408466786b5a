"""Concept traces on the demo model's two-hop prompts: where the intermediate state peaks and how often
the true path (city -> its state -> its capital) outscores wrong ones.

    python scripts/concepts_report.py [--model demo] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from circuits.demo.two_hop import TwoHopResult, patching_at_state_peak, study, two_hop_cases
from circuits.models import load_model


def summarise(model, results: list[TwoHopResult], n_patched: int) -> dict:
    n, n_layers = len(results), model.cfg.n_layers
    peaks = Counter(r.state_peak for r in results)
    patched = [patching_at_state_peak(model, r) for r in results[:n_patched]]
    return {
        "prompts": n,
        "state peak cell (layer, position): count": dict(peaks.most_common(4)),
        "state peaks at a middle layer": sum(0 < r.state_peak[0] < n_layers for r in results) / n,
        "state is the top token at its peak": sum(r.state_peak_rank == 1 for r in results) / n,
        "mean state probability at its peak": sum(r.state_peak_prob for r in results) / n,
        "state is the top state at the last token, per layer": [
            sum(r.state_rank_last_position[l] == 1 for r in results) / n for l in range(n_layers + 1)
        ],
        "true > wrong path (continuous score)": sum(r.true_score > r.wrong_score for r in results) / n,
        "true > wrong path (x0.5 baseline)": sum(r.true_baseline > r.wrong_baseline for r in results) / n,
        "true path ranks first of 50": sum(r.true_rank_among_paths == 1 for r in results) / n,
        f"patching, first {len(patched)}: recovered at the state's peak cell": sum(p[0] for p in patched)
        / len(patched),
        f"patching, first {len(patched)}: ... at that layer, last token": sum(p[1] for p in patched) / len(patched),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seed", type=int, default=0, help="draws the wrong state of each prompt")
    parser.add_argument("--patched", type=int, default=20, help="prompts per kind checked by patching")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    results = study(model, two_hop_cases(), seed=args.seed)
    tokens = model.to_str_tokens(results[0].prompt)
    print(f"tokens of the first prompt: {list(enumerate(tokens))}")
    print("rows: layer r = residual stream after r blocks (0 = embeddings)")
    for kind in ("two_hop", "two_hop_held_out"):
        print(f"\n## {kind}")
        for key, value in summarise(model, [r for r in results if r.kind == kind], args.patched).items():
            shown = [f"{v:.2f}" for v in value] if isinstance(value, list) else value
            print(f"{key:>55}: {f'{shown:.3f}' if isinstance(shown, float) else shown}")


if __name__ == "__main__":
    main()
