"""Train a cross-layer transcoder on a TransformerLens model.

Objective (inputs and outputs normalised so E||x|| = sqrt(d) per layer; folded into the weights
on export):
    MSE summed over target layers
  + lambda_S(t) * sum_f tanh(c * a_f * ||W_dec_f||)   (||.|| over the feature's concatenated decoders,
                                                       lambda_S ramped linearly over the run)
  + lambda_P * sum_{f dead} relu(threshold_f - pre_f)   (pre-activation loss: revives dead features)
Adam with linear warm-up and a final linear decay, gradient clipping, straight-through gradient
for the JumpReLU thresholds. Checkpoints (weights, optimiser, RNG, step) are written atomically;
a resumed run reaches the same weights as an uninterrupted one because the data stream is a pure
function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.attribution.splice import splice_hooks
from circuits.errors import CircuitsError
from circuits.fileio import atomic_directory, atomic_file, surviving_directory
from circuits.text import TextSource
from circuits.train.activations import ActivationStream, held_out, held_out_tokens
from circuits.train.parallel import Comm
from circuits.transcoders.circuit_tracer import save_transcoder
from circuits.transcoders.clt import CLTConfig, CrossLayerTranscoder

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str = "demo"
    """'demo', a local model directory or a TransformerLens model name."""
    text: str = "demo"
    """Training text: 'demo', a .txt/.jsonl file, or 'hf:DATASET'."""
    n_features: int = 1024
    """Features per layer."""
    cross_layer: bool = True
    skip: bool = False
    activation: str = "jumprelu"
    topk: int = 16
    steps: int = 2000
    batch_tokens: int = 1024
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    sparsity_coef: float = 0.4
    """lambda_S at the end of the ramp."""
    sparsity_c: float = 4.0
    preact_coef: float = 3e-4
    bandwidth: float = 0.05
    initial_threshold: float = 0.1
    target_fire_fraction: float = 0.02
    """Initial b_enc makes each feature fire on about this fraction of tokens."""
    grad_clip: float = 1.0
    parallel: str = "data"
    """Under torchrun: 'data' (each rank holds the whole CLT) or 'feature' (each rank owns F/N
    features of every layer)."""
    dead_after_tokens: int = 200_000
    """A feature that has not fired for this many tokens is dead and gets the pre-activation loss."""
    eval_every: int = 200
    checkpoint_every: int = 500
    docs_per_chunk: int = 512
    activation_cache: str = ""
    """A directory for safetensors shards of the activations (read back by runs with the same text
    settings, e.g. a sweep); empty: no cache."""
    eval_docs: int = 256
    """Held-out documents for the metrics (reconstruction and replacement model)."""
    max_tokens_per_doc: int = 64
    seed: int = 0
    threads: int = 0
    """torch threads (0: leave torch's default)."""
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise CircuitsError(f"unknown recipe keys {unknown}: valid keys are {sorted(known)}")
        defaults = cls()
        for key, value in fields.items():
            expected = type(getattr(defaults, key))
            if not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
                raise CircuitsError(f"recipe key {key!r} must be {expected.__name__}, not {value!r}")
        return cls(**fields)

    def clt_config(self, model: HookedTransformer) -> CLTConfig:
        return CLTConfig(
            n_layers=model.cfg.n_layers,
            d_model=model.cfg.d_model,
            n_features=self.n_features,
            cross_layer=self.cross_layer,
            skip=self.skip,
            activation=self.activation,
            topk=self.topk,
            bandwidth=self.bandwidth,
            model_name=self.model,
        )


def load_recipe(path: Path) -> TrainConfig:
    """A TrainConfig from a TOML recipe of its fields."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise CircuitsError(f"recipe {str(path)!r} does not exist: pass a TOML file such as training/demo.toml")
    try:
        fields = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise CircuitsError(f"recipe {str(path)!r} is not valid TOML ({e})") from None
    return TrainConfig.from_dict(fields)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warmup, decay_start = cfg.warmup_fraction * cfg.steps, (1 - cfg.decay_fraction) * cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (cfg.steps - step) / max(1.0, cfg.steps - decay_start))
    return 1.0


def sparsity_factor(step: int, cfg: TrainConfig) -> float:
    return min(1.0, (step + 1) / cfg.steps)


@dataclass
class Scales:
    """Per-layer factors [L] with x_norm = x * inp, y_norm = y * out."""

    inp: torch.Tensor
    out: torch.Tensor

    @classmethod
    def estimate(cls, x: torch.Tensor, y: torch.Tensor) -> Scales:
        d = x.shape[-1]
        return cls(d**0.5 / x.norm(dim=-1).mean(0), d**0.5 / y.norm(dim=-1).mean(0))


@torch.no_grad()
def initialise(clt: CrossLayerTranscoder, x: torch.Tensor, cfg: TrainConfig) -> None:
    """Set thresholds and b_enc so each feature fires on about `target_fire_fraction` of x [n, L, d]."""
    clt.threshold.fill_(cfg.initial_threshold)
    pre = torch.einsum("nld,lfd->nlf", x, clt.W_enc)
    quantile = torch.quantile(pre, 1 - cfg.target_fire_fraction, dim=0)  # [L, F]
    clt.b_enc.copy_(cfg.initial_threshold - quantile)
    clt.b_dec.zero_()


def decoder_norms(clt: CrossLayerTranscoder) -> torch.Tensor:
    """||W_dec_f|| over each feature's concatenated decoders: [L, F]."""
    return torch.stack([w.square().sum(dim=(1, 2)).sqrt() for w in clt.W_dec])


@dataclass
class StepLoss:
    total: torch.Tensor
    parts: dict[str, float]
    fired: torch.Tensor  # [L, F] bool: features active on some token of the batch
    l0: torch.Tensor  # [L] mean active features per token


def losses(
    clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, step: int, cfg: TrainConfig, dead: torch.Tensor,
    sparse: bool = True, comm: Comm | None = None,
) -> StepLoss:  # fmt: skip
    """The training objective on this rank's normalised x, y [n, L, d]; `dead` [L, F] marks the
    features that get the pre-activation loss. `sparse` touches only supported features (same
    values and gradients as the dense reference, which runs in a single process only). Every term
    is normalised by the global batch size, so the ranks' losses sum to the single-process loss."""
    comm = comm or Comm()
    n_global, L = len(x) * comm.world, clt.cfg.n_layers
    norms = decoder_norms(clt)  # [L, F]
    if sparse:
        x_enc = comm.gather_rows(x)  # the tokens this rank's features encode
        acts = [clt.encode_sparse(x_enc[:, l], l) for l in range(L)]
        recon = comm.reduce_rows(clt.decode_sparse(acts, bias=False)) + clt.b_dec + clt.skip_out(x)
        sparsity = sum(torch.tanh(cfg.sparsity_c * a.values * norms[l, a.feature]).sum() for l, a in enumerate(acts))
        fired = torch.zeros_like(dead)
        for l, a in enumerate(acts):
            fired[l, a.feature[a.values > 0]] = True
        l0 = torch.stack([(a.values > 0).sum() for a in acts]) / len(x_enc)
    else:
        x_enc = x
        dense = clt.encode(x)  # [n, L, F]
        recon = clt.decode(dense) + clt.skip_out(x)
        sparsity = torch.tanh(cfg.sparsity_c * dense * norms).sum()
        fired, l0 = (dense > 0).any(0), (dense > 0).sum((0, 2)) / len(x)
    mse = (recon - y).square().sum()
    preact = x.new_zeros(())
    if cfg.activation == "jumprelu":
        for l in range(L):
            idx = dead[l].nonzero()[:, 0]
            pre = x_enc[:, l] @ clt.W_enc[l, idx].T + clt.b_enc[l, idx]  # [n, n_dead]
            preact = preact + torch.relu(clt.threshold[l, idx].detach() - pre).sum()  # raise pre, not lower θ
    total = (mse + cfg.sparsity_coef * sparsity_factor(step, cfg) * sparsity + cfg.preact_coef * preact) / n_global
    parts = {"mse": mse.item() / len(x), "sparsity": sparsity.item() / len(x_enc), "preact": preact.item() / len(x_enc)}
    return StepLoss(total, parts, fired, l0)


@torch.no_grad()
def reconstruction_metrics(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-layer normalised MSE and L0, and the fraction of features firing on over 10% of tokens,
    on normalised x, y [n, L, d]."""
    recon, acts = clt(x)
    nmse = (recon - y).square().sum((0, 2)) / (y - y.mean(0)).square().sum((0, 2))
    fire_rate = (acts > 0).float().mean(0)  # [L, F]
    return {
        "nmse": nmse.tolist(),
        "l0": fire_rate.sum(-1).tolist(),
        "dense_fraction": (fire_rate > 0.1).float().mean().item(),
    }


@torch.no_grad()
def replacement_metrics(model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor, mask) -> dict:
    """The replacement model (CLT in place of every MLP) against the real model on tokens [b, p],
    over the positions in mask [b, p]: KL(real || replacement), cross-entropy recovered relative
    to zero-ablating every MLP, and top-1 next-token agreement."""
    real = model(tokens).log_softmax(-1)
    repl = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(model, clt)).log_softmax(-1)
    zero = [(f"blocks.{l}.hook_mlp_out", lambda o, hook: torch.zeros_like(o)) for l in range(model.cfg.n_layers)]
    ablated = model.run_with_hooks(tokens, fwd_hooks=zero).log_softmax(-1)
    m = mask[:, :-1]
    nxt = tokens[:, 1:]

    def ce(logp):
        return -logp[:, :-1].gather(-1, nxt[..., None])[..., 0][m].mean().item()

    kl = (real.exp() * (real - repl)).sum(-1)[mask].mean().item()
    ce_real, ce_repl, ce_abl = ce(real), ce(repl), ce(ablated)
    return {
        "kl": kl,
        "ce_real": ce_real,
        "ce_replacement": ce_repl,
        "ce_ablated": ce_abl,
        "ce_recovered": (ce_abl - ce_repl) / (ce_abl - ce_real),
        "top1_agreement": (real.argmax(-1) == repl.argmax(-1))[mask].float().mean().item(),
    }


# ---- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(path: Path, clt, opt, scales: Scales, step: int, cfg: TrainConfig, last_fired, comm: Comm) -> None:
    """Write the full training state (gathered from every rank; rank 0 writes) atomically."""
    names = [k for k, _ in clt.named_parameters()]
    tensors = {f"clt.{k}": v.detach() for k, v in comm.gather(dict(clt.named_parameters())).items()}
    opt_state = opt.state_dict()
    for i, name in enumerate(names):
        for k, v in opt_state["state"].get(i, {}).items():
            tensors[f"opt.{k}.{name}"] = comm.gather({name: v})[name] if v.dim() else v
    tensors["last_fired"] = comm.gather({"b_enc": last_fired})["b_enc"]  # [L, F]: features on dim 1, like b_enc
    tensors.update({"scales.inp": scales.inp, "scales.out": scales.out, "rng.torch": torch.get_rng_state()})
    meta = {"step": step, "config": dataclasses.asdict(cfg), "opt_param_groups": opt_state["param_groups"]}
    if not comm.is_main:
        return
    with atomic_directory(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(path: Path, clt, opt, comm: Comm) -> tuple[int, Scales, torch.Tensor]:
    """Restore this rank's part of a checkpoint; returns (step, scales, last_fired [L, F_rank])."""
    path = surviving_directory(path)  # a kill during the last save's swap leaves the previous one
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise CircuitsError(f"no checkpoint in {path}: train without --resume first")
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise CircuitsError(f"checkpoint {path} is corrupt or truncated ({e}): delete it and retrain") from None
    names = [k for k, _ in clt.named_parameters()]
    full = {k: tensors[f"clt.{k}"] for k in names}
    expected = {k: tuple(v.shape) for k, v in comm.gather(dict(clt.named_parameters())).items()}
    if {k: tuple(v.shape) for k, v in full.items()} != expected:
        raise CircuitsError(f"checkpoint {path} holds a transcoder of other shapes: it is from another recipe")
    clt.load_state_dict(comm.shard(full))
    state: dict = {}
    for i, name in enumerate(names):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            v = tensors[f"opt.{k}.{name}"]
            state.setdefault(i, {})[k] = comm.shard({name: v})[name] if v.dim() else v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    last_fired = comm.shard({"b_enc": tensors["last_fired"]})["b_enc"]
    return meta["step"], Scales(tensors["scales.inp"], tensors["scales.out"]), last_fired


# ---- export ----------------------------------------------------------------------------------


@torch.no_grad()
def fold_scales(clt: CrossLayerTranscoder, scales: Scales) -> CrossLayerTranscoder:
    """A copy of `clt` that takes raw activations and writes raw MLP outputs."""
    folded = CrossLayerTranscoder(clt.cfg)
    folded.load_state_dict(clt.state_dict())
    folded.W_enc.mul_(scales.inp[:, None, None])
    for s, w in enumerate(folded.W_dec):
        targets = [t for t in range(clt.cfg.n_layers) if s in clt.sources(t)]
        w.div_(scales.out[targets][None, :, None])
    folded.b_dec.div_(scales.out[:, None])
    if folded.W_skip is not None:
        folded.W_skip.mul_((scales.inp / scales.out)[:, None, None])
    return folded


# ---- the loop --------------------------------------------------------------------------------


def train(cfg: TrainConfig, out: Path, resume: bool = False, model: HookedTransformer | None = None) -> dict:
    """Train a CLT per `cfg`, writing checkpoints, metrics.jsonl and the final transcoder to `out`
    (rank 0 writes). Under `torchrun`, trains across processes per `cfg.parallel`. Returns the
    last metrics."""
    from circuits.models import check_device, load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_device(cfg.device)
    comm = Comm.from_env(cfg.parallel, cfg.device)
    torch.manual_seed(cfg.seed)
    model = model or load_model(cfg.model, device=cfg.device)
    full = CrossLayerTranscoder(cfg.clt_config(model)).to(cfg.device)  # every rank: the same init
    source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
    stream = ActivationStream(model, source, cfg.batch_tokens, cfg.docs_per_chunk, cfg.activation_cache or None)
    x0, y0 = next(stream.batches(0))
    scales = Scales.estimate(x0, y0)
    initialise(full, x0 * scales.inp[:, None], cfg)
    shard_cfg = dataclasses.replace(full.cfg, n_features=full.cfg.n_features // comm.world)
    clt = full if comm.mode != "feature" else CrossLayerTranscoder(shard_cfg).to(cfg.device)
    clt.load_state_dict(comm.shard(full.state_dict()))
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    ckpt = out / "checkpoint"
    start, last_fired = 0, torch.zeros_like(clt.b_enc, dtype=torch.long)
    if resume:
        start, scales, last_fired = load_checkpoint(ckpt, clt, opt, comm)
        log.info("resumed from step %d", start)
    if comm.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / "metrics.jsonl", start)
        with atomic_file(out / "train_config.json") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    x_eval, y_eval = held_out(model, source, cfg.eval_docs)
    x_eval, y_eval = x_eval * scales.inp[:, None], y_eval * scales.out[:, None]
    eval_tokens, eval_mask = held_out_tokens(model, source, cfg.eval_docs // 2)
    metrics: dict = {}
    t0, tokens_seen = time.time(), 0
    bar = tqdm(stream.batches(start), total=cfg.steps - start, desc="CLT", unit="step", disable=not comm.is_main)
    for step, (x, y) in zip(range(start, cfg.steps), bar, strict=False):
        x = comm.local_rows(x.to(cfg.device)) * scales.inp[:, None]
        y = comm.local_rows(y.to(cfg.device)) * scales.out[:, None]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        dead = (step - last_fired) >= cfg.dead_after_tokens // cfg.batch_tokens
        result = losses(clt, x, y, step, cfg, dead, comm=comm)
        if not math.isfinite(result.total.item()):
            raise CircuitsError(
                f"the loss became {result.total.item()} at step {step}: lower lr or sparsity_coef; "
                f"the last good checkpoint is kept in {ckpt}"
            )
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        comm.sync_grads(clt.named_parameters())
        norm = comm.grad_norm(clt.named_parameters())
        for p in clt.parameters():
            if p.grad is not None:
                p.grad.mul_(torch.clamp(cfg.grad_clip / (norm + 1e-6), max=1.0))
        opt.step()
        with torch.no_grad():
            clt.threshold.clamp_(min=0.0)  # JumpReLU: a feature is off below a non-negative threshold
        last_fired = torch.where(comm.any_rank(result.fired), step + 1, last_fired)
        tokens_seen += cfg.batch_tokens
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            whole = _whole(clt, full, comm)
            dead_fraction = comm.gather({"b_enc": dead.float()})["b_enc"].mean().item()
            if comm.is_main:
                metrics = {
                    "step": step + 1,
                    **result.parts,
                    **reconstruction_metrics(whole, x_eval, y_eval),
                    "dead_fraction": dead_fraction,
                    "tokens_per_second": tokens_seen / (time.time() - t0),
                    **replacement_metrics(model, fold_scales(whole, scales), eval_tokens, eval_mask),
                }
                _log_metrics(bar, out, metrics)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, clt, opt, scales, step + 1, cfg, last_fired, comm)
    whole = _whole(clt, full, comm)
    if comm.is_main:
        save_transcoder(fold_scales(whole, scales), out)
        with atomic_file(out / "training.json") as f:
            json.dump({"config": dataclasses.asdict(cfg), "metrics": metrics}, f, indent=2)
    return metrics


def _whole(clt: CrossLayerTranscoder, full: CrossLayerTranscoder, comm: Comm) -> CrossLayerTranscoder:
    """The whole CLT (gathered from the shards in feature mode; `full` is its container)."""
    if comm.mode == "feature":
        full.load_state_dict(comm.gather(clt.state_dict()))
        return full
    return clt


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics logged up to `step` (a resumed run logs the rest again)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept))


def _log_metrics(bar, out: Path, metrics: dict) -> None:
    L = len(metrics["nmse"])
    nmse, l0, top1 = sum(metrics["nmse"]) / L, sum(metrics["l0"]) / L, metrics["top1_agreement"]
    bar.set_postfix(nmse=f"{nmse:.3f}", l0=f"{l0:.1f}", top1=f"{top1:.3f}")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
