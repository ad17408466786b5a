"""Training speed and quality on stored activations at realistic L0: ours against decode-clt (JumpReLU
CLT) and sparsify (TopK per-layer transcoders) in the same script, one thread each, the same batches
of an activation store.

    circuits activations training/demo.toml --out /tmp/store --tokens 60000
    python scripts/bench_train.py --store /tmp/store [--features 1024 8192] [--l0 90 200] [--steps 100]
        [--topk 32] [--peer-python /work/peer-train-venv/bin/python] [--peer-lambda 1e-6 0]
        [--precision fp32 bf16-mixed]

Each (system, F, L0) runs in a fresh subprocess with one thread: a transcoder over the store's layers,
initialised so that about L0 features fire per layer and token, then trained for --steps optimiser
steps of 1,024 tokens at learning rate --lr (constant; the same batches for every system, the
store's shards in order). tok/s: whole optimiser steps (encode, decode, loss, backward, clipping,
Adam), all but the first (warm-up), per second of wall time and per second of the process's CPU time
(cpu tok/s: what a core of its own would give, the steadier figure on a shared machine). Then, on
the first --eval-tokens held-out tokens: NMSE (squared error over squared deviation from the mean,
per layer, averaged over layers) and L0 per layer.

- JumpReLU rows (F x L0): ours steers each layer's L0 towards L0 (`target_l0`, as a recipe can);
  decode-clt 0.0.1 has its thresholds set to each feature's quantile on the first batch and trains
  with its own loss (sparsity lambda ramped over the run, as its trainer does), so its L0 drifts:
  its default lambda (1e-3) takes it to ~1 feature per token here, so --peer-lambda gives one per
  L0, picked so that its L0 ends near the asked one at F 1,024 (its step is dense: its speed does
  not depend on its L0). Its lambda ramps over --steps, so its L0 at the end depends on both: at F
  8,192 and L0 200, lambda 0 leaves it at ~590 after 20 steps and ~510 after 100; for NMSE at matched
  L0 there, `--steps 100 --peer-lambda 1e-6` ends it at L0 ~190 (a sweep of lambda 1e-7 to 5e-5 over
  60 and 100 steps, 2026-12).
- TopK rows (F x k, with --topk): per-layer transcoders, ours (`cross_layer = false`, `activation =
  "topk"`) against sparsify 1.3.3 (`transcode=True`, Adam at the same lr, decoder kept at unit norm
  as its trainer does; no AuxK loss).
- Precision (--precision): ours runs once per precision, `fp32` and `bf16-mixed` (the recipe field:
  matmuls in bfloat16, float32 weights and Adam). decode-clt 0.0.1 enables autocast on CUDA and MPS
  only (clt/training/trainer.py), so on a CPU it runs fp32 in every row; sparsify's forward
  autocasts on CUDA only, and here runs under torch.autocast("cpu", bfloat16) in its bf16-mixed rows.

The peers run with the Python given by --peer-python (a scratch venv with decode-clt==0.0.1 and
eai-sparsify==1.3.3; never project dependencies) and are skipped without it. Prints a table with
our / peer ratios and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BATCH = 1024


def _normalised(store: Path, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [n, L, d] scaled to E||x|| = sqrt(d) per layer by the store's statistics (read without
    circuits, so that a peer's venv can run this)."""
    manifest = json.loads((store / "manifest.json").read_text())
    stats, d = manifest["statistics"], manifest["d_model"]
    inp, out = d**0.5 / torch.tensor(stats["x_mean_norm"]), d**0.5 / torch.tensor(stats["y_mean_norm"])
    return tensors["x"].float() * inp[:, None], tensors["y"].float() * out[:, None]


def _batches(store: Path, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches [BATCH, L, d] of the store's shards, in order (a shard's tail left out)."""
    manifest, batches = json.loads((store / "manifest.json").read_text()), []
    while len(batches) < n:
        for shard in manifest["shards"]:
            x, y = _normalised(store, load_file(str(store / shard["file"])))
            batches += [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x) - BATCH + 1, BATCH)]
    return batches[:n]


def _held_out(store: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = json.loads((store / "manifest.json").read_text())
    x, y = _normalised(store, load_file(str(store / manifest["held_out"]["file"])))
    return x[:n], y[:n]


def _quality(recon: torch.Tensor, y: torch.Tensor, l0: float) -> dict:
    """Held-out NMSE of recon against y [n, L, d], averaged over layers, and L0 per layer."""
    nmse = (recon - y).square().sum((0, 2)) / (y - y.mean(0)).square().sum((0, 2))
    return {"nmse": nmse.mean().item(), "l0": l0}


def ours(args, batches, held) -> dict:
    from circuits.heap import keep_freed_memory
    from circuits.train.config import TrainConfig, TranscoderConfig
    from circuits.train.loop import optimiser
    from circuits.train.objective import SparsityControl, initialise, losses
    from circuits.train.store import ActivationStore
    from circuits.transcoders.clt import CrossLayerTranscoder

    F, l0 = args.features[0], args.l0[0]
    if args.one_topk:
        transcoder = TranscoderConfig(n_features=F, cross_layer=False, activation="topk", topk=int(l0))
        cfg = TrainConfig(transcoder=transcoder, lr=args.lr, sparsity_coef=0.0, steps=args.steps)
    else:
        transcoder = TranscoderConfig(n_features=F)
        cfg = TrainConfig(
            transcoder=transcoder, target_fire_fraction=l0 / F, lr=args.lr, target_l0=l0, steps=args.steps
        )
    cfg = dataclasses.replace(cfg, precision=args.precision[0])
    keep_freed_memory()  # as `circuits train` on a CPU
    clt = CrossLayerTranscoder(ActivationStore(args.store).clt_config(cfg.transcoder))
    initialise(clt, batches[0][0], cfg)
    opt, sparsity = optimiser(clt, cfg), SparsityControl.start(clt.cfg.n_layers)
    dead = torch.zeros(clt.cfg.n_layers, F, dtype=torch.bool)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> None:  # as `circuits.train.loop._step`, one process
        result = losses(clt, x, y, step=i, cfg=cfg, dead=dead, coef=sparsity.at(i, cfg))
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            clt.threshold.clamp_(min=0.0)
        if cfg.target_l0:
            sparsity.update(result.l0, cfg, clt)

    speed = _timed(step, batches)
    with torch.no_grad():
        recon, acts = clt(held[0])
    return speed | _quality(recon, held[1], (acts > 0).sum(-1).float().mean().item())


def decode_clt(args, batches, held) -> dict:
    from clt.config import CLTConfig, TrainingConfig
    from clt.models.clt import CrossLayerTranscoder
    from clt.training.losses import LossManager

    F, l0 = args.features[0], args.l0[0]
    L, d = batches[0][0].shape[1:]
    config = CLTConfig(num_features=F, num_layers=L, d_model=d, activation_fn="jumprelu")
    training = TrainingConfig(
        learning_rate=args.lr, training_steps=args.steps, train_batch_size_tokens=BATCH,
        activation_path=str(args.store), sparsity_lambda=args.peer_lambda[0],
    )  # fmt: skip
    model = CrossLayerTranscoder(config, process_group=None, device=torch.device("cpu"))
    with torch.no_grad():  # each feature fires on about l0 / F of the first batch
        x0 = batches[0][0]
        quantiles = [torch.quantile(model.get_preactivations(x0[:, l], l), 1 - l0 / F, dim=0) for l in range(L)]
        model.theta_manager.log_threshold.copy_(torch.log(torch.stack(quantiles).clamp(min=1e-4)))
    loss_manager = LossManager(training)
    opt = torch.optim.AdamW(model.parameters(), lr=training.learning_rate)
    dead = torch.zeros(L, F, dtype=torch.bool)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        inputs, targets = {l: x[:, l] for l in range(L)}, {l: y[:, l] for l in range(L)}
        opt.zero_grad(set_to_none=True)
        acts = model.get_feature_activations(inputs)  # as its trainer's step: then the loss, which decodes
        loss, _ = loss_manager.compute_total_loss(
            model, inputs, targets, i, args.steps, precomputed_activations=acts, dead_neuron_mask=dead
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.decoder_module._cached_decoder_norms = None  # as its trainer does after each step

    speed = _timed(step, batches)
    with torch.no_grad():
        inputs = {l: held[0][:, l] for l in range(L)}
        recon = model(inputs)
        active = sum((a > 0).float().sum(-1).mean().item() for a in model.get_feature_activations(inputs).values())
    return speed | _quality(torch.stack([recon[l] for l in range(L)], 1), held[1], active / L)


def sparsify(args, batches, held) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    F, k = args.features[0], int(args.l0[0])
    L, d = batches[0][0].shape[1:]
    coders = [SparseCoder(d, SparseCoderConfig(num_latents=F, k=k, transcode=True)) for _ in range(L)]
    params = [p for c in coders for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision[0] == "bf16-mixed")

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> None:  # as its trainer's step with Adam, no AuxK
        with autocast:  # its forward autocasts on CUDA only; this gives it bf16-mixed on the CPU
            loss = sum(c(x[:, l], y[:, l]).fvu for l, c in enumerate(coders))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for c in coders:
            c.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for c in coders:
            c.set_decoder_norm_to_unit_norm()

    speed = _timed(step, batches)
    with torch.no_grad():
        recon = torch.stack([c(held[0][:, l], held[1][:, l]).sae_out for l, c in enumerate(coders)], 1)
    return speed | _quality(recon, held[1], float(k))


def _timed(step, batches: list) -> dict:
    step(0, *batches[0])  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (x, y) in enumerate(batches[1:], 1):
        step(i, x, y)
    tokens = BATCH * (len(batches) - 1)
    return {
        "tokens_per_s": tokens / (time.perf_counter() - start),
        "cpu_tokens_per_s": tokens / (time.process_time() - cpu_start),
    }


SYSTEMS = {"ours": ours, "decode-clt": decode_clt, "sparsify": sparsify}


def _run(
    python: str, system: str, args, F: int, l0: float, topk: bool, peer_lambda: float = 0.0, precision: str = "fp32"
) -> dict:  # fmt: skip
    cmd = [python, __file__, "--one", system, "--store", str(args.store), "--features", str(F), "--l0", str(l0)]
    cmd += ["--steps", str(args.steps), "--lr", str(args.lr), "--eval-tokens", str(args.eval_tokens)]
    cmd += ["--peer-lambda", str(peer_lambda), "--precision", precision]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, *(["--one-topk"] if topk else [])], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{system} F {F} L0 {l0} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cells(result: dict) -> str:
    return (
        f"{result['tokens_per_s']:>7.0f} {result['cpu_tokens_per_s']:>7.0f} {result['nmse']:>6.4f} {result['l0']:>6.1f}"
    )


def _ratios(mine: dict, theirs: dict) -> str:
    """ours / peer in tok/s and in cpu tok/s."""
    return " ".join(f"{mine[k] / theirs[k]:.2f}" for k in ("tokens_per_s", "cpu_tokens_per_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="an activation store (`circuits activations`)")
    parser.add_argument("--features", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--l0", type=float, nargs="*", default=[90.0, 200.0], help="L0 of the JumpReLU rows")
    parser.add_argument("--topk", type=int, nargs="*", default=[32], help="k of the TopK rows (none: no such rows)")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps of 1,024 tokens per run")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for NMSE and L0")
    parser.add_argument(
        "--peer-python", default="/work/peer-train-venv/bin/python", help="a venv with the peers ('': ours only)"
    )
    parser.add_argument(
        "--peer-lambda", type=float, nargs="+", default=[1e-6, 0.0], help="decode-clt's sparsity_lambda per --l0"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32", "bf16-mixed"],
        choices=["fp32", "bf16-mixed"],
        help="our precisions (a row of ours for each; the peers run fp32 on CPU)",
    )
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--one-topk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        batches, held = _batches(args.store, args.steps), _held_out(args.store, args.eval_tokens)
        print(json.dumps(SYSTEMS[args.one](args, batches, held)))
        return
    peer = bool(args.peer_python) and Path(args.peer_python).exists()  # "": ours only
    if peer and args.l0 and len(args.peer_lambda) != len(args.l0):
        parser.error(f"--peer-lambda needs one value per --l0 ({len(args.l0)})")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.steps} steps of {BATCH} tokens, lr {args.lr}; NMSE, L0/layer: {args.eval_tokens} held-out tokens")
    cells = f"{'tok/s':>7} {'cpu':>7} {'NMSE':>6} {'L0':>6}"
    print(f"{'F':>6} {'L0':>5} {'precision':>10} | ours: {cells} | {'peer':>16}: {cells} | ratio (tok/s, cpu)")
    lambdas = dict(zip(args.l0, args.peer_lambda, strict=False))  # decode-clt runs only: lengths checked above
    rows = [(F, l0, False, "decode-clt", lambdas[l0]) for F in args.features for l0 in args.l0]
    rows += [(F, k, True, "sparsify", 0.0) for F in args.features for k in args.topk]
    for F, l0, topk, peer_name, peer_lambda in rows:
        theirs = {}
        for precision in args.precision:
            mine = _run(sys.executable, "ours", args, F, l0, topk, precision=precision)
            row = f"{F:>6} {('k ' if topk else '') + f'{l0:.0f}':>5} {precision:>10} | ours: {_cells(mine)} |"
            if peer:  # decode-clt autocasts on CUDA and MPS only: fp32 here; sparsify is given ours
                peer_precision = precision if peer_name == "sparsify" else "fp32"
                if peer_precision not in theirs:
                    theirs[peer_precision] = _run(
                        args.peer_python, peer_name, args, F, l0, topk, peer_lambda, peer_precision
                    )  # fmt: skip
                label = f"{peer_name} {peer_precision}"
                row += f" {label:>16}: {_cells(theirs[peer_precision])} | {_ratios(mine, theirs[peer_precision])}"
            print(row, flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
