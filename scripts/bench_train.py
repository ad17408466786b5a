"""Training throughput on stored activations at realistic L0: ours against decode-clt (JumpReLU CLT)
in the same script, one thread each, the same batches of an activation store.

    circuits activations training/demo.toml --out /tmp/store --tokens 40000
    python scripts/bench_train.py --store /tmp/store [--features 1024 8192] [--l0 90 200] [--steps 4]
        [--peer-python /work/peer-train-venv/bin/python]

Each (system, F, L0) runs in a fresh subprocess: a CLT over the store's layers, initialised so that
about L0 features fire per layer and token (ours: `initialise`; decode-clt: its JumpReLU thresholds
set to each feature's quantile on the first batch), trained with a learning rate of ~0 so that L0
stays there; tokens/s of whole optimiser steps (encode, decode, loss, backward, clipping, Adam)
after one warm-up step. decode-clt runs with the Python given by --peer-python (a scratch venv with
decode-clt==0.0.1; never a project dependency) and is skipped without it. Prints a table with
our / decode-clt ratios and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BATCH = 1024


def _batches(store: Path, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches [BATCH, L, d] of the store's first shard, normalised to E||x|| = sqrt(d)
    per layer by the store's statistics (read without circuits, so that a peer's venv can run this)."""
    manifest = json.loads((store / "manifest.json").read_text())
    stats, d = manifest["statistics"], manifest["d_model"]
    inp, out = d**0.5 / torch.tensor(stats["x_mean_norm"]), d**0.5 / torch.tensor(stats["y_mean_norm"])
    shard = load_file(str(store / manifest["shards"][0]["file"]))
    x, y = shard["x"].float() * inp[:, None], shard["y"].float() * out[:, None]
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(n)]


def ours(store: Path, F: int, l0: float, steps: int) -> dict:
    from circuits.train.config import TrainConfig, TranscoderConfig
    from circuits.train.objective import initialise, losses
    from circuits.train.store import ActivationStore
    from circuits.transcoders.clt import CrossLayerTranscoder

    batches = _batches(store, steps + 1)
    cfg = TrainConfig(transcoder=TranscoderConfig(n_features=F), target_fire_fraction=l0 / F, lr=1e-7)
    clt = CrossLayerTranscoder(ActivationStore(store).clt_config(cfg.transcoder))
    initialise(clt, batches[0][0], cfg)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr)
    dead = torch.zeros(clt.cfg.n_layers, F, dtype=torch.bool)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        result = losses(clt, x, y, step=i, cfg=cfg, dead=dead)
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        opt.step()
        return result.l0.mean().item()

    return _timed(step, batches)


def decode_clt(store: Path, F: int, l0: float, steps: int) -> dict:
    from clt.config import CLTConfig, TrainingConfig
    from clt.models.clt import CrossLayerTranscoder
    from clt.training.losses import LossManager

    batches = _batches(store, steps + 1)
    L, d = batches[0][0].shape[1:]
    config = CLTConfig(num_features=F, num_layers=L, d_model=d, activation_fn="jumprelu")
    training = TrainingConfig(
        learning_rate=1e-7, training_steps=1000, train_batch_size_tokens=BATCH, activation_path=str(store)
    )
    model = CrossLayerTranscoder(config, process_group=None, device=torch.device("cpu"))
    with torch.no_grad():  # each feature fires on about l0 / F of the first batch
        x0 = batches[0][0]
        quantiles = [torch.quantile(model.get_preactivations(x0[:, l], l), 1 - l0 / F, dim=0) for l in range(L)]
        model.theta_manager.log_threshold.copy_(torch.log(torch.stack(quantiles).clamp(min=1e-4)))
    loss_manager = LossManager(training)
    opt = torch.optim.AdamW(model.parameters(), lr=training.learning_rate)
    dead = torch.zeros(L, F, dtype=torch.bool)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        inputs, targets = {l: x[:, l] for l in range(L)}, {l: y[:, l] for l in range(L)}
        opt.zero_grad(set_to_none=True)
        acts = model.get_feature_activations(inputs)  # as its trainer's step: then the loss, which decodes
        loss, _ = loss_manager.compute_total_loss(
            model, inputs, targets, i, 1000, precomputed_activations=acts, dead_neuron_mask=dead
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.decoder_module._cached_decoder_norms = None  # as its trainer does after each step
        return sum((a > 0).float().sum(-1).mean().item() for a in acts.values()) / L

    return _timed(step, batches)


def _timed(step, batches: list) -> dict:
    step(0, *batches[0])  # warm-up
    start = time.perf_counter()
    l0s = [step(i, x, y) for i, (x, y) in enumerate(batches[1:], 1)]
    seconds = time.perf_counter() - start
    return {"tokens_per_s": BATCH * len(l0s) / seconds, "l0": sum(l0s) / len(l0s)}


SYSTEMS = {"ours": ours, "decode-clt": decode_clt}


def _run(python: str, system: str, store: Path, F: int, l0: float, steps: int) -> dict:
    cmd = [python, __file__, "--one", system, "--store", str(store), "--features", str(F), "--l0", str(l0)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, "--steps", str(steps)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{system} F {F} L0 {l0} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="an activation store (`circuits activations`)")
    parser.add_argument("--features", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--l0", type=float, nargs="+", default=[90.0, 200.0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps of 1,024 tokens per run")
    parser.add_argument("--peer-python", default="/work/peer-train-venv/bin/python", help="a venv with decode-clt")
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: one run in this process
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        print(json.dumps(SYSTEMS[args.one](args.store, args.features[0], args.l0[0], args.steps)))
        return
    peer = Path(args.peer_python).exists()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'F':>6} {'L0 asked':>8} | {'ours tok/s':>10} {'L0':>6} | {'decode-clt tok/s':>16} {'L0':>6} | ratio")
    for F in args.features:
        for l0 in args.l0:
            mine = _run(sys.executable, "ours", args.store, F, l0, args.steps)
            theirs = _run(args.peer_python, "decode-clt", args.store, F, l0, args.steps) if peer else None
            row = f"{F:>6} {l0:>8.0f} | {mine['tokens_per_s']:>10.0f} {mine['l0']:>6.1f} |"
            if theirs:
                ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
                row += f" {theirs['tokens_per_s']:>16.0f} {theirs['l0']:>6.1f} | {ratio:.2f}"
            print(row, flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
