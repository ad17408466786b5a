"""Train a cross-layer transcoder on a TransformerLens model.

Objective (inputs and outputs normalised so E||x|| = sqrt(d) per layer; folded into the weights
on export):
    MSE summed over target layers
  + lambda_S(t) * sum_f tanh(c * a_f * ||W_dec_f||)   (||.|| over the feature's concatenated decoders,
                                                       lambda_S ramped linearly over the run)
  + lambda_P * sum_f relu(threshold_f - pre_f)          (pre-activation loss: revives dead features)
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuits.activations import ActivationStream, TextSource, held_out
from circuits.clt import CLTConfig, CrossLayerTranscoder
from circuits.errors import CircuitsError
from circuits.formats import atomic_directory, atomic_file, save_transcoder

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
    sparsity_coef: float = 1e-3
    """lambda_S at the end of the ramp."""
    sparsity_c: float = 4.0
    preact_coef: float = 3e-6
    bandwidth: float = 0.05
    initial_threshold: float = 0.1
    target_fire_fraction: float = 0.02
    """Initial b_enc makes each feature fire on about this fraction of tokens."""
    grad_clip: float = 1.0
    eval_every: int = 200
    checkpoint_every: int = 500
    docs_per_chunk: int = 512
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


def losses(
    clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, step: int, cfg: TrainConfig, sparse: bool = True
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Total loss, its parts, and the activations [n, L, F], for normalised x, y [n, L, d]."""
    recon, acts = clt(x, sparse=sparse)
    mse = (recon - y).square().sum(-1)  # [n, L]
    pre = clt.pre_activations(x)
    sparsity = torch.tanh(cfg.sparsity_c * acts * decoder_norms(clt)).sum((-1, -2)).mean()
    preact = F.relu(clt.threshold - pre).sum((-1, -2)).mean() if cfg.activation == "jumprelu" else mse.new_zeros(())
    total = mse.sum(-1).mean() + cfg.sparsity_coef * sparsity_factor(step, cfg) * sparsity + cfg.preact_coef * preact
    parts = {"mse": mse.sum(-1).mean().item(), "sparsity": sparsity.item(), "preact": preact.item()}
    return total, parts, acts


@torch.no_grad()
def reconstruction_metrics(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-layer normalised MSE and L0 on normalised x, y [n, L, d]."""
    recon, acts = clt(x)
    nmse = (recon - y).square().sum((0, 2)) / (y - y.mean(0)).square().sum((0, 2))
    return {"nmse": nmse.tolist(), "l0": (acts > 0).float().sum(-1).mean(0).tolist()}


def splice_hooks(model: HookedTransformer, clt: CrossLayerTranscoder) -> list:
    """Forward hooks that replace every MLP output by the CLT's reconstruction, each layer's
    features read from the spliced model's own resid_mid (the replacement model)."""
    L = model.cfg.n_layers
    acts: dict[int, torch.Tensor] = {}

    def read(x, hook, l):
        acts[l] = clt.encode_layer(x, l)
        if clt.W_skip is not None:
            acts[("x", l)] = x

    def write(out, hook, l):
        recon = clt.b_dec[l] + sum(acts[s] @ clt.decoder(s, l) for s in clt.sources(l))
        if clt.W_skip is not None:
            recon = recon + acts[("x", l)] @ clt.W_skip[l]
        return recon

    hooks = []
    for l in range(L):
        hooks.append((f"blocks.{l}.hook_resid_mid", lambda x, hook, l=l: read(x, hook, l)))
        hooks.append((f"blocks.{l}.hook_mlp_out", lambda o, hook, l=l: write(o, hook, l)))
    return hooks


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


def save_checkpoint(path: Path, clt, opt, scales: Scales, step: int, cfg: TrainConfig, last_fired) -> None:
    tensors = {f"clt.{k}": v.detach().contiguous() for k, v in clt.state_dict().items()}
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.contiguous()
    tensors.update({"scales.inp": scales.inp, "scales.out": scales.out, "last_fired": last_fired})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "config": dataclasses.asdict(cfg), "opt_param_groups": opt_state["param_groups"]}
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(path: Path, clt, opt) -> tuple[int, Scales, torch.Tensor]:
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise CircuitsError(f"no checkpoint in {path}: train without --resume first")
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:  # safetensors raises SafetensorError (a ValueError subclass) on truncation
        raise CircuitsError(f"checkpoint {path} is corrupt or truncated ({e}): delete it and retrain") from None
    clt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("clt.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], Scales(tensors["scales.inp"], tensors["scales.out"]), tensors["last_fired"]


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
    """Train a CLT per `cfg`, writing checkpoints, metrics.jsonl and the final transcoder to `out`.
    Returns the final metrics."""
    from circuits.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model or load_model(cfg.model, device=cfg.device)
    clt = CrossLayerTranscoder(cfg.clt_config(model)).to(cfg.device)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    source = TextSource(cfg.text, seed=cfg.seed, max_tokens_per_doc=cfg.max_tokens_per_doc)
    stream = ActivationStream(model, source, cfg.batch_tokens, cfg.docs_per_chunk)
    x_eval, y_eval = held_out(model, source)
    ckpt = out / "checkpoint"
    L, Fn = clt.cfg.n_layers, clt.cfg.n_features
    if resume:
        start, scales, last_fired = load_checkpoint(ckpt, clt, opt)
        log.info("resumed from step %d", start)
    else:
        start, last_fired = 0, torch.zeros(L, Fn, dtype=torch.long)
        x0, y0 = next(stream.batches(0))
        scales = Scales.estimate(x0, y0)
        initialise(clt, x0 * scales.inp[:, None], cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    x_eval, y_eval = x_eval * scales.inp[:, None], y_eval * scales.out[:, None]
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics: dict = {}
    t0, tokens_seen = time.time(), 0
    bar = tqdm(stream.batches(start), total=cfg.steps - start, initial=0, desc="CLT", unit="step")
    for step, (x, y) in zip(range(start, cfg.steps), bar):
        x, y = x.to(cfg.device) * scales.inp[:, None], y.to(cfg.device) * scales.out[:, None]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        loss, parts, acts = losses(clt, x, y, step, cfg)
        if not math.isfinite(loss.item()):
            raise CircuitsError(
                f"the loss became {loss.item()} at step {step}: lower lr or sparsity_coef; "
                f"the last good checkpoint is kept in {ckpt}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        opt.step()
        fired = (acts > 0).any(0)
        last_fired = torch.where(fired, step + 1, last_fired)
        tokens_seen += len(x)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            metrics = {
                "step": step + 1,
                **parts,
                **reconstruction_metrics(clt, x_eval, y_eval),
                "dead_fraction": ((step + 1 - last_fired) > 10_000 // cfg.batch_tokens * 10).float().mean().item(),
                "dense_fraction": ((acts > 0).float().mean(0) > 0.5).float().mean().item(),
                "tokens_per_second": tokens_seen / (time.time() - t0),
            }
            bar.set_postfix(nmse=f"{sum(metrics['nmse']) / L:.3f}", l0=f"{sum(metrics['l0']) / L:.1f}")
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt, clt, opt, scales, step + 1, cfg, last_fired)
    folded = fold_scales(clt, scales)
    tokens, mask = _eval_tokens(model, source)
    metrics.update(replacement_metrics(model, folded, tokens, mask))
    save_transcoder(folded, out)
    with atomic_file(out / "training.json") as f:
        json.dump({"config": dataclasses.asdict(cfg), "metrics": metrics}, f, indent=2)
    return metrics


def _eval_tokens(model: HookedTransformer, source: TextSource, n_docs: int = 128):
    from circuits.activations import token_mask

    other = TextSource(source.name, seed=source.seed + 7919, max_tokens_per_doc=source.max_tokens_per_doc)
    tokens = model.to_tokens(other.documents(0, n_docs), padding_side="right")[:, : source.max_tokens_per_doc]
    return tokens, token_mask(model, tokens)
