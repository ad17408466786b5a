"""Training throughput of the CLT trainer: our sparse path vs our dense reference, same process
setup, one thread. `python scripts/bench_train.py [--features 1024 8192] [--steps 10]`

Each configuration runs in a fresh subprocess (so peak memory is its own) on the same real
activations of the demo model (4 layers, d_model 128, batches of 1,024 tokens), initialised so
that about `--l0` features fire per layer and token. Prints tokens/s of a full training step
(encode, decode, loss, backward, Adam), the sparse/dense ratio and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_one(n_features: int, sparse: bool, steps: int, l0: float) -> dict:
    from circuits.models import load_model
    from circuits.text import TextSource
    from circuits.train.activations import ActivationStream
    from circuits.train.config import TrainConfig, TranscoderConfig
    from circuits.train.objective import Scales, initialise, losses
    from circuits.transcoders.clt import CrossLayerTranscoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_model("demo")
    # lr ~ 0 keeps L0 where it was initialised: the cost of a step does not depend on lr
    cfg = TrainConfig(transcoder=TranscoderConfig(n_features=n_features), target_fire_fraction=l0 / n_features, lr=1e-7)
    clt = CrossLayerTranscoder(cfg.clt_config(model))
    stream = ActivationStream(model, clt.cfg, TextSource("demo"), batch_tokens=1024)
    batches = [b for _, b in zip(range(steps + 2), stream.batches(0), strict=False)]
    scales = Scales.estimate(*batches[0])
    batches = [(x * scales.inp[:, None], y * scales.out[:, None]) for x, y in batches]
    initialise(clt, batches[0][0], cfg)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr)
    dead = torch.zeros(4, n_features, dtype=torch.bool)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    l0s = []
    for i, (x, y) in enumerate(batches):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        result = losses(clt, x, y, step=i, cfg=cfg, dead=dead, sparse=sparse)
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        opt.step()
        l0s.append(result.l0.mean().item())
    seconds = time.perf_counter() - start
    return {
        "features": n_features,
        "path": "sparse" if sparse else "dense",
        "tokens_per_s": steps * 1024 / seconds,
        "l0": sum(l0s[2:]) / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--l0", type=float, default=32.0, help="initial features firing per layer and token")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: F and path of one run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1] == "sparse", args.steps, args.l0)))
        return
    print(f"{'F':>6} {'path':>7} {'tokens/s':>9} {'L0':>6} {'peak RSS MB':>12} {'train RSS MB':>13}")
    for F in args.features:
        rows = {}
        for path in ("sparse", "dense"):
            cmd = [sys.executable, __file__, "--one", str(F), path, "--steps", str(args.steps), "--l0", str(args.l0)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[path] = r = json.loads(out.strip().splitlines()[-1])
            print(
                f"{F:>6} {path:>7} {r['tokens_per_s']:>9.0f} {r['l0']:>6.1f} {r['peak_rss_mb']:>12.0f} "
                f"{r['train_rss_mb']:>13.0f}"
            )
        print(f"{F:>6} sparse/dense speed ratio {rows['sparse']['tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
