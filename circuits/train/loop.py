"""Train a cross-layer transcoder on a TransformerLens model: `train(cfg, out)`.

Three phases, one function each: `_setup` builds the run (model, CLT initialised from the first
batch and sharded across torchrun ranks, Adam, the activation stream, held-out data; restored
from out/checkpoint on resume), `_step` takes one optimiser step (the objective of
`train.objective`, gradient clipping, a non-negative JumpReLU threshold), `_evaluate` logs the
metrics of `train.metrics` to out/metrics.jsonl. A resumed run reaches the same weights as an
uninterrupted one because the data stream is a pure function of (seed, step) and the checkpoint
holds the optimiser, RNG and firing history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.fileio import write_json
from circuits.models import check_device, load_model
from circuits.text import TextSource
from circuits.train.activations import ActivationStream, held_out, held_out_tokens
from circuits.train.checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from circuits.train.config import TrainConfig
from circuits.train.metrics import reconstruction_metrics, replacement_metrics
from circuits.train.objective import Scales, StepLoss, fold_scales, initialise, losses, lr_factor
from circuits.train.parallel import Comm
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder

log = logging.getLogger(__name__)


@dataclass
class _HeldOut:
    """Held-out data for the metrics: normalised activations x, y [n, L, d] and tokens, mask [b, p]."""

    x: torch.Tensor
    y: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def collect(
        cls, model: HookedTransformer, clt_cfg: CLTConfig, source: TextSource, n_docs: int, scales: Scales
    ) -> _HeldOut:
        x, y = held_out(model, clt_cfg, source, n_docs)
        tokens, mask = held_out_tokens(model, source, n_docs // 2)
        return cls(x * scales.inp[:, None], y * scales.out[:, None], tokens, mask)


@dataclass
class _Run:
    """A training run's state: built by `_setup`, advanced by `_step`."""

    cfg: TrainConfig
    out: Path
    comm: Comm
    model: HookedTransformer
    full: CrossLayerTranscoder  # the whole CLT; in feature mode, the container `clt`'s shards gather into
    clt: CrossLayerTranscoder  # what this rank trains: `full`, or its F/N features of every layer
    opt: torch.optim.Optimizer
    stream: ActivationStream
    scales: Scales
    start: int  # the first step this process runs
    last_fired: torch.Tensor  # [L, F_rank] long: 1 + the last step each feature fired at
    held_out: _HeldOut
    started: float  # time.time() when the first step began

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"


def train(cfg: TrainConfig, out: Path, resume: bool = False, model: HookedTransformer | None = None) -> dict:
    """Train a CLT per `cfg`, writing checkpoints, metrics.jsonl and the final transcoder to `out`
    (rank 0 writes). Under `torchrun`, trains across processes per `cfg.parallel`. Returns the
    last metrics (empty on ranks other than 0)."""
    run = _setup(cfg, out, resume, model)
    metrics: dict = {}
    batches = run.stream.batches(run.start)
    bar = tqdm(batches, total=cfg.steps - run.start, desc="CLT", unit="step", disable=not run.comm.is_main)
    for step, (x, y) in zip(range(run.start, cfg.steps), bar, strict=False):
        result = _step(run, step, x, y)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = _evaluate(run, step, result)
            if metrics:
                L = len(metrics["nmse"])
                nmse, l0 = sum(metrics["nmse"]) / L, sum(metrics["l0"]) / L
                bar.set_postfix(nmse=f"{nmse:.3f}", l0=f"{l0:.1f}", top1=f"{metrics['top1_agreement']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(run.checkpoint, run.clt, run.opt, run.scales, step + 1, cfg, run.last_fired, run.comm)
    whole = _whole(run)
    if run.comm.is_main:
        save_transcoder(fold_scales(whole, run.scales), out)
        write_json(out / "training.json", {"config": dataclasses.asdict(cfg), "metrics": metrics}, indent=2)
    return metrics


def _setup(cfg: TrainConfig, out: Path, resume: bool, model: HookedTransformer | None) -> _Run:
    """The run at its first step: from scratch (every rank draws the same initial CLT and keeps
    its part), or from out/checkpoint with `resume`. Rank 0 writes out/train_config.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device)
    comm = Comm.from_env(cfg.parallel, cfg.device)
    torch.manual_seed(cfg.seed)
    model = model or load_model(cfg.model, device=cfg.device)
    clt_cfg = cfg.clt_config(model)  # refuses hooks that do not fit the model, before any work
    full = CrossLayerTranscoder(clt_cfg).to(cfg.device)
    source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
    cache_dir = cfg.activation_cache or None
    stream = ActivationStream(model, clt_cfg, source, cfg.batch_tokens, cfg.docs_per_chunk, cache_dir)
    x0, y0 = next(stream.batches(0))
    scales = Scales.estimate(x0, y0)
    initialise(full, x0 * scales.inp[:, None], cfg)
    shard_cfg = dataclasses.replace(full.cfg, n_features=full.cfg.n_features // comm.world)
    clt = full if comm.mode != "feature" else CrossLayerTranscoder(shard_cfg).to(cfg.device)
    clt.load_state_dict(comm.shard(full.state_dict()))
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    start, last_fired = 0, torch.zeros_like(clt.b_enc, dtype=torch.long)
    if resume:
        start, scales, last_fired = load_checkpoint(out / "checkpoint", clt, opt, comm)
        log.info("resumed from step %d", start)
    if comm.is_main:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out / "metrics.jsonl", start)
        write_json(out / "train_config.json", dataclasses.asdict(cfg), indent=2)
    evaluation = _HeldOut.collect(model, clt_cfg, source, cfg.eval_docs, scales)
    return _Run(cfg, out, comm, model, full, clt, opt, stream, scales, start, last_fired, evaluation, time.time())


def _step(run: _Run, step: int, x: torch.Tensor, y: torch.Tensor) -> StepLoss:
    """One optimiser step on the global batch x, y [batch_tokens, L, d] of raw activations (this
    rank keeps its rows); raises CircuitsError if the loss is no longer finite."""
    cfg, clt, comm = run.cfg, run.clt, run.comm
    x = comm.local_rows(x.to(cfg.device)) * run.scales.inp[:, None]
    y = comm.local_rows(y.to(cfg.device)) * run.scales.out[:, None]
    for g in run.opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg)
    dead = (step - run.last_fired) >= cfg.dead_after_tokens // cfg.batch_tokens
    result = losses(clt, x, y, step, cfg, dead, comm=comm)
    if not math.isfinite(result.total.item()):
        raise CircuitsError(
            f"the loss became {result.total.item()} at step {step}: lower lr or sparsity_coef; "
            f"the last good checkpoint is kept in {run.checkpoint}"
        )
    run.opt.zero_grad(set_to_none=True)
    result.total.backward()
    comm.sync_grads(clt.named_parameters())
    norm = comm.grad_norm(clt.named_parameters())
    for p in clt.parameters():
        if p.grad is not None:
            p.grad.mul_(torch.clamp(cfg.grad_clip / (norm + 1e-6), max=1.0))
    run.opt.step()
    with torch.no_grad():
        clt.threshold.clamp_(min=0.0)  # JumpReLU: a feature is off below a non-negative threshold
    run.last_fired = torch.where(comm.any_rank(result.fired), step + 1, run.last_fired)
    return result


def _evaluate(run: _Run, step: int, result: StepLoss) -> dict:
    """The metrics after `step` (its loss parts, and the whole CLT on the held-out data), appended
    to out/metrics.jsonl by rank 0. Every rank takes part in the gathers; the others return {}."""
    whole = _whole(run)
    dead_fraction = run.comm.gather({"b_enc": result.dead.float()})["b_enc"].mean().item()
    if not run.comm.is_main:
        return {}
    data = run.held_out
    metrics = {
        "step": step + 1,
        **result.parts,
        **reconstruction_metrics(whole, data.x, data.y),
        "dead_fraction": dead_fraction,
        "tokens_per_second": (step + 1 - run.start) * run.cfg.batch_tokens / (time.time() - run.started),
        **replacement_metrics(run.model, fold_scales(whole, run.scales), data.tokens, data.mask),
    }
    with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    return metrics


def _whole(run: _Run) -> CrossLayerTranscoder:
    """The whole CLT (gathered from the shards in feature mode, a collective; else `run.clt`)."""
    if run.comm.mode == "feature":
        run.full.load_state_dict(run.comm.gather(run.clt.state_dict()))
        return run.full
    return run.clt
