"""Train a cross-layer transcoder: `train(cfg, out)`, from a model's activations on the fly or from
an activation store (`cfg.activations`, no model needed).

Three phases, one function each: `_setup` builds the run (the data source, CLT initialised from the
first batch and sharded across torchrun ranks, Adam, DDP in data mode, held-out data; restored
from out/checkpoint on resume), `_step` takes one optimiser step (the objective of
`train.objective`, gradient clipping, a non-negative JumpReLU threshold, target-L0 steering),
`_evaluate` logs the metrics of `train.metrics` to out/metrics.jsonl. A resumed run reaches the
same weights as an uninterrupted one because the data stream is a pure function of (seed, step)
and the checkpoint holds the optimiser, RNG, firing history and steering state. Ctrl-C or SIGTERM
checkpoints the current step and raises `Interrupted`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.errors import CircuitsError
from circuits.fileio import write_json
from circuits.heap import keep_freed_memory
from circuits.models import check_device, load_model
from circuits.text import TextSource
from circuits.train.activations import ActivationStream, held_out, held_out_tokens
from circuits.train.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint, truncate_metrics
from circuits.train.config import TrainConfig
from circuits.train.metrics import reconstruction_metrics, replacement_metrics
from circuits.train.objective import (
    Objective,
    Scales,
    SparsityControl,
    StepLoss,
    fold_scales,
    initialise,
    losses,
    lr_factor,
)  # fmt: skip
from circuits.train.parallel import Comm
from circuits.train.store import ActivationStore
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder, check_fits

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after writing a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"saved step {step}; resume with --resume")
        self.step, self.signum = step, signum


@dataclass
class _Data:
    """Where a run's activations come from: the model on the fly, or a store (`cfg.activations`)."""

    clt_cfg: CLTConfig
    model: HookedTransformer | None  # None: a store run without replacement-model metrics
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # start step -> raw (x, y) batches
    scales: Scales | None  # a store's; None: estimated from the first batch
    held_out: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # raw held-out (x, y) [n, L, d]
    text: TextSource

    @classmethod
    def from_model(cls, cfg: TrainConfig, comm: Comm, model: HookedTransformer | None) -> _Data:
        model = model or load_model(cfg.model, device=cfg.device)
        clt_cfg = cfg.clt_config(model)  # refuses hooks that do not fit the model, before any work
        source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
        cache_dir = cfg.activation_cache or None
        stream = ActivationStream(model, clt_cfg, source, cfg.batch_tokens, cfg.docs_per_chunk, cache_dir, comm)
        held = functools.partial(held_out, model, clt_cfg, source, cfg.eval_docs)
        return cls(clt_cfg, model, stream.batches, None, held, source)

    @classmethod
    def from_store(cls, cfg: TrainConfig, model: HookedTransformer | None) -> _Data:
        store = ActivationStore(cfg.activations)
        clt_cfg = store.clt_config(cfg.transcoder)
        if model is None and cfg.model:
            if cfg.model != store.manifest["model"]:
                raise CircuitsError(
                    f"the recipe's model {cfg.model!r} is not the store's ({store.manifest['model']!r}): "
                    'name the store\'s model for the replacement-model metrics, or set model = "" to skip them'
                )
            model = load_model(cfg.model, device=cfg.device)
        if model is not None:
            check_fits(clt_cfg, model)
        batches = functools.partial(store.batches, cfg.batch_tokens, cfg.seed)
        return cls(clt_cfg, model, batches, Scales(*store.scales()), store.held_out, store.text_source())


@dataclass
class _HeldOut:
    """Held-out data for the metrics: normalised activations x, y [n, L, d] and, with a model,
    tokens and mask [b, p] for the replacement model."""

    x: torch.Tensor
    y: torch.Tensor
    tokens: torch.Tensor | None
    mask: torch.Tensor | None

    @classmethod
    def collect(cls, data: _Data, n_docs: int, scales: Scales, device: str) -> _HeldOut:
        x, y = data.held_out()
        tokens = mask = None
        if data.model is not None:
            tokens, mask = held_out_tokens(data.model, data.text, n_docs // 2)
        return cls(x.to(device) * scales.inp[:, None], y.to(device) * scales.out[:, None], tokens, mask)


@dataclass
class _Run:
    """A training run's state: built by `_setup`, advanced by `_step`."""

    cfg: TrainConfig
    out: Path
    comm: Comm
    model: HookedTransformer | None  # for the replacement-model metrics
    full: CrossLayerTranscoder  # the whole CLT; in feature mode, the container `clt`'s shards gather into
    clt: CrossLayerTranscoder  # what this rank trains: `full`, or its F/N features of every layer
    ddp: DistributedDataParallel | None  # data mode: the objective, its gradients averaged by DDP
    opt: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # raw (x, y) from step `start` on
    scales: Scales
    sparsity: SparsityControl
    start: int  # the first step this process runs
    last_fired: torch.Tensor  # [L, F_rank] long: 1 + the last step each feature fired at
    held_out: _HeldOut
    started: float  # time.time() when the first step began

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"

    def save(self, step: int) -> None:
        """Checkpoint the state after `step` steps (a collective in feature mode)."""
        save_checkpoint(
            self.checkpoint, self.clt, self.opt, self.scales, step, self.cfg, self.last_fired, self.comm, self.sparsity
        )


def train(cfg: TrainConfig, out: Path, resume: bool = False, model: HookedTransformer | None = None) -> dict:
    """Train a CLT per `cfg`, writing checkpoints, metrics.jsonl and the final transcoder to `out`
    (rank 0 writes). Under `torchrun`, trains across processes per `cfg.parallel`. Returns the
    last metrics (empty on ranks other than 0). Ctrl-C or SIGTERM checkpoints the current step and
    raises `Interrupted`."""
    _check(cfg)
    with Comm.opened(cfg.parallel, cfg.device) as comm:
        return _loop(_setup(cfg, comm, out, resume, model))


def _loop(run: _Run) -> dict:
    """Steps from `run.start` to the last, then the final transcoder (rank 0 writes)."""
    cfg, out = run.cfg, run.out
    metrics: dict = {}
    bar = tqdm(total=cfg.steps, initial=run.start, desc="CLT", unit="step", disable=not run.comm.is_main)
    with _stop_requests() as stop:
        for step, (x, y) in zip(range(run.start, cfg.steps), run.batches, strict=False):
            result = _step(run, step, x, y)
            bar.update()
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                metrics = _evaluate(run, step, result)
                if metrics:
                    L = len(metrics["nmse"])
                    bar.set_postfix(nmse=f"{sum(metrics['nmse']) / L:.3f}", l0=f"{sum(metrics['l0']) / L:.1f}")
            saved = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            if saved:
                run.save(step + 1)
            signum = run.comm.max_int(stop[0] if stop else 0)  # every rank stops at the same step
            if signum:
                if not saved:
                    run.save(step + 1)
                bar.close()
                raise Interrupted(step + 1, signum)
    bar.close()
    whole = _whole(run)
    if run.comm.is_main:
        save_transcoder(fold_scales(whole, run.scales), out)
        write_json(out / "training.json", {"config": dataclasses.asdict(cfg), "metrics": metrics}, indent=2)
    return metrics


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Within: Ctrl-C and SIGTERM append their signal number to the yielded list instead of
    stopping the process mid-step (the loop checkpoints and stops); a second one acts as usual.
    Outside the main thread (where handlers cannot be set) the list stays empty."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        got.append(signum)
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _check(cfg: TrainConfig) -> None:
    """Refuse a recipe this machine cannot run; set the thread count and the CPU heap."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device)
    if cfg.device == "cpu":
        keep_freed_memory()
    if cfg.target_l0 and cfg.transcoder.activation == "topk":
        raise CircuitsError("a TopK transcoder's L0 is its topk: set transcoder.topk instead of target_l0")


def _setup(cfg: TrainConfig, comm: Comm, out: Path, resume: bool, model: HookedTransformer | None) -> _Run:
    """The run at its first step: from scratch (every rank draws the same initial CLT and keeps
    its part), or from out/checkpoint with `resume`. Rank 0 writes out/train_config.json."""
    torch.manual_seed(cfg.seed)
    data = _Data.from_store(cfg, model) if cfg.activations else _Data.from_model(cfg, comm, model)
    full = CrossLayerTranscoder(data.clt_cfg).to(cfg.device)
    x0, y0 = next(data.batches(0))
    scales = data.scales or Scales.estimate(x0, y0)
    fire = cfg.target_l0 / cfg.transcoder.n_features if cfg.target_l0 else cfg.target_fire_fraction
    initialise(full, (x0 * scales.inp[:, None]).to(cfg.device), dataclasses.replace(cfg, target_fire_fraction=fire))
    shard_cfg = dataclasses.replace(full.cfg, n_features=full.cfg.n_features // comm.world)
    clt = full if comm.mode != "feature" else CrossLayerTranscoder(shard_cfg).to(cfg.device)
    clt.load_state_dict(comm.shard(full.state_dict()))
    opt = optimiser(clt, cfg)
    sparsity = SparsityControl.start(data.clt_cfg.n_layers)
    start, last_fired = 0, torch.zeros_like(clt.b_enc, dtype=torch.long)
    if resume:
        start, scales, last_fired = load_checkpoint(out / "checkpoint", clt, opt, comm, sparsity)
        scales = Scales(*scales)
        log.info("resumed from step %d", start)
    scales = Scales(scales.inp.to(cfg.device), scales.out.to(cfg.device))
    if comm.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / "checkpoint")
        truncate_metrics(out / "metrics.jsonl", start)
        write_json(out / "train_config.json", dataclasses.asdict(cfg), indent=2)
    ddp = None
    if comm.mode == "data":  # TopK and ReLU never use the threshold
        unused = cfg.transcoder.activation != "jumprelu"
        ddp = DistributedDataParallel(Objective(clt, cfg), find_unused_parameters=unused)
    evaluation = _HeldOut.collect(data, cfg.eval_docs, scales, cfg.device)
    return _Run(
        cfg, out, comm, data.model, full, clt, ddp, opt, data.batches(start), scales, sparsity, start, last_fired,
        evaluation, time.time(),
    )  # fmt: skip


def optimiser(clt: CrossLayerTranscoder, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the CLT's parameters; fused (one pass over each tensor, ~5x faster than the
    per-tensor loop on one CPU thread at F 8,192), the same update up to rounding."""
    return torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)


def _step(run: _Run, step: int, x: torch.Tensor, y: torch.Tensor) -> StepLoss:
    """One optimiser step on the global batch x, y [batch_tokens, L, d] of raw activations (this
    rank keeps its rows); raises CircuitsError if the loss is no longer finite."""
    cfg, clt, comm = run.cfg, run.clt, run.comm
    x = comm.local_rows(x.to(cfg.device)) * run.scales.inp[:, None]
    y = comm.local_rows(y.to(cfg.device)) * run.scales.out[:, None]
    for g in run.opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg)
    dead = (step - run.last_fired) >= cfg.dead_after_tokens // cfg.batch_tokens
    coef = run.sparsity.at(step, cfg)
    if run.ddp is not None:
        result = run.ddp(x, y, step, dead, coef)
    else:
        result = losses(clt, x, y, step, cfg, dead, comm=comm, coef=coef)
    if not math.isfinite(result.total.item()):
        raise CircuitsError(
            f"the loss became {result.total.item()} at step {step}: lower lr or sparsity_coef; "
            f"the last good checkpoint is kept in {run.checkpoint}"
        )
    run.opt.zero_grad(set_to_none=True)
    result.total.backward()  # data mode: DDP averages the gradients over ranks here
    comm.sync_grads(clt.named_parameters())  # feature mode: the replicated parameters' gradients
    norm = comm.grad_norm(clt.named_parameters())
    for p in clt.parameters():
        if p.grad is not None:
            p.grad.mul_(torch.clamp(cfg.grad_clip / (norm + 1e-6), max=1.0))
    run.opt.step()
    with torch.no_grad():
        clt.threshold.clamp_(min=0.0)  # JumpReLU: a feature is off below a non-negative threshold
    run.last_fired = torch.where(comm.any_rank(result.fired), step + 1, run.last_fired)
    if cfg.target_l0:
        run.sparsity.update(comm.global_l0(result.l0), cfg, clt)
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
        "sparsity_coef": run.sparsity.at(step, run.cfg).tolist(),
    }
    if run.model is not None:
        metrics |= replacement_metrics(run.model, fold_scales(whole, run.scales), data.tokens, data.mask)
    with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
    return metrics


def _whole(run: _Run) -> CrossLayerTranscoder:
    """The whole CLT (gathered from the shards in feature mode, a collective; else `run.clt`)."""
    if run.comm.mode == "feature":
        run.full.load_state_dict(run.comm.gather(run.clt.state_dict()))
        return run.full
    return run.clt
