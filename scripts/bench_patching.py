"""Batched activation patching vs one forward pass per patch, on the demo flagship prompt.

python scripts/bench_patching.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from circuits.concepts.patching import patching_grid
from circuits.models import load_model

CLEAN = "Fact: Dallas is in the state whose capital is"
CORRUPT = "Fact: Chicago is in the state whose capital is"


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("demo")
    results = {b: patching_grid(model, CLEAN, CORRUPT, batch_size=b) for b in (1, 64)}
    for kind, grid in results[64].grids.items():
        assert torch.allclose(grid, results[1].grids[kind], atol=1e-4), kind
    times = {
        b: best_time(lambda b=b: patching_grid(model, CLEAN, CORRUPT, batch_size=b), args.repeats) for b in (1, 64)
    }
    n = sum(g.numel() for g in results[64].grids.values())
    print(f"{n} patches (resid_pre, attn_out, mlp_out, heads), best of {args.repeats}")
    print(f"one patch per forward pass: {times[1]:.3f} s")
    print(f"64 patches per forward pass: {times[64]:.3f} s  ({times[1] / times[64]:.1f}x faster)")


if __name__ == "__main__":
    main()
