"""The training objective of a cross-layer transcoder, its schedules, initialisation and scales.

Inputs and outputs are normalised so E||x|| = sqrt(d) per layer (`Scales`; folded into the
weights on export by `fold_scales`). The loss:
    MSE summed over target layers
  + lambda_S(t) * sum_f tanh(c * a_f * ||W_dec_f||)   (||.|| over the feature's concatenated decoders,
                                                       lambda_S ramped linearly over the run)
  + lambda_P * sum_{f dead} relu(threshold_f - pre_f)   (pre-activation loss: revives dead features)
The learning rate has a linear warm-up and a final linear decay (`lr_factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from circuits.train.kernels import LayerTerms, decoder_norm, encode
from circuits.train.parallel import Comm
from circuits.transcoders.clt import CrossLayerTranscoder

if TYPE_CHECKING:  # in annotations only
    from circuits.train.config import TrainConfig


MATMUL_DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16}
"""`TrainConfig.precision` -> the dtype of the step's encoder and decoder matmuls (None: the
parameters' own)."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` as a fraction of cfg.lr."""
    warmup, decay_start = cfg.warmup_fraction * cfg.steps, (1 - cfg.decay_fraction) * cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (cfg.steps - step) / max(1.0, cfg.steps - decay_start))
    return 1.0


def sparsity_factor(step: int, cfg: TrainConfig) -> float:
    """lambda_S at `step` as a fraction of cfg.sparsity_coef."""
    return min(1.0, (step + 1) / cfg.steps)


TARGET_GAIN = 0.05
"""With `target_l0`: how far the steering variable moves per step, per unit of log(L0 / target)."""


@dataclass
class SparsityControl:
    """lambda_S of each layer: the recipe's linear ramp, or with `cfg.target_l0`, steered by
    feedback from each batch's L0: u[l] += TARGET_GAIN * log(L0[l] / target) (clamped to [-1, 1])
    and lambda_S[l] = max(sparsity_coef, 0.01) * sinh(u[l]) / sinh(1), which starts at 0 (the
    initial thresholds already give the target L0), moves in proportion (log-like) while large, and
    turns negative (rewards firing) where a layer fires less than the target even without a
    penalty. JumpReLU thresholds, scaled at once by the same error, do the fast steering: started at
    the recipe's coefficient instead, lambda_S pulled L0 down while it was still at the target and the
    two loops oscillated (L0 200 asked at F 1,024: 80 to 420 within 100 steps, ending at 114). A
    deterministic function of the run's state, checkpointed, so resume stays exact."""

    u: torch.Tensor  # [L] the steering variable (with target_l0)

    @classmethod
    def start(cls, n_layers: int) -> SparsityControl:
        return cls(torch.zeros(n_layers))

    def at(self, step: int, cfg: TrainConfig) -> torch.Tensor:
        """lambda_S [L] for `step`."""
        if cfg.target_l0:
            return max(cfg.sparsity_coef, 0.01) * torch.sinh(self.u) / math.sinh(1.0)
        return torch.full_like(self.u, cfg.sparsity_coef * sparsity_factor(step, cfg))

    def update(self, l0: torch.Tensor, cfg: TrainConfig, clt: CrossLayerTranscoder) -> None:
        """Steer by the batch's L0 [L] (active features per token of each layer); JumpReLU
        thresholds are also scaled by exp(THRESHOLD_GAIN * error) at once."""
        error = torch.log(l0.detach().cpu().clamp(min=0.01) / cfg.target_l0).clamp(-1.0, 1.0)
        self.u = self.u + TARGET_GAIN * error
        if clt.cfg.activation == "jumprelu":
            with torch.no_grad():
                clt.threshold.mul_(torch.exp(THRESHOLD_GAIN * error).to(clt.threshold.device)[:, None])


THRESHOLD_GAIN = 0.3
"""With `target_l0` and JumpReLU: how far log(threshold) moves per step, per unit of log(L0 / target)."""


@dataclass
class Scales:
    """Per-layer factors [L] with x_norm = x * inp, y_norm = y * out."""

    inp: torch.Tensor
    out: torch.Tensor

    @classmethod
    def estimate(cls, x: torch.Tensor, y: torch.Tensor) -> Scales:
        """The factors that give a batch x, y [n, L, d] a mean norm of sqrt(d) per layer."""
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
    return torch.stack([decoder_norm(w) for w in clt.W_dec])


@dataclass
class StepLoss:
    total: torch.Tensor
    parts: dict[str, float]  # mse, sparsity, preact: per token, before their coefficients
    fired: torch.Tensor  # [L, F] bool: features active on some token of the batch
    l0: torch.Tensor  # [L] mean active features per token
    dead: torch.Tensor  # [L, F] bool: the features that got the pre-activation loss


def losses(
    clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, step: int, cfg: TrainConfig, dead: torch.Tensor,
    sparse: bool = True, comm: Comm | None = None, coef: torch.Tensor | None = None,
) -> StepLoss:  # fmt: skip
    """The training objective on this rank's normalised x, y [n, L, d]; `dead` [L, F] marks the
    features that get the pre-activation loss. `sparse` runs `train.kernels` (each layer dense or
    only at its supported features, by density; the same values and gradients as the dense
    reference, which runs in a single process only, always in the parameters' dtype; with
    cfg.precision "bf16-mixed" the kernels' encoder and decoder matmuls run in bfloat16, the
    rest, the loss and its sums in the parameters' dtype). Every term
    is normalised by the global batch size, so the ranks' losses sum to the single-process loss.
    `coef` [L] is lambda_S of each layer (default: the recipe's ramp at `step`)."""
    comm = comm or Comm()
    if coef is None:
        coef = torch.full((clt.cfg.n_layers,), cfg.sparsity_coef * sparsity_factor(step, cfg))
    coef = coef.to(x.device)
    n_global = len(x) * comm.world
    if sparse:
        x_enc = comm.gather_rows(x)  # the tokens this rank's features encode
        dtype = MATMUL_DTYPES[cfg.precision] or clt.W_enc.dtype
        acts = encode(clt, x_enc, dtype)
        terms = [a.terms(clt.W_dec[l], cfg.sparsity_c, dtype) for l, a in enumerate(acts)]
        recon = comm.reduce_rows(_reconstruction(clt, terms, len(x_enc))) + clt.b_dec + clt.skip_out(x)
        sparsity = torch.stack([t.penalty for t in terms])  # [L]
        fired, l0 = torch.stack([t.fired for t in terms]), torch.stack([t.active for t in terms]) / len(x_enc)
    else:
        x_enc = x
        dense = clt.encode(x)  # [n, L, F]
        recon = clt.decode(dense) + clt.skip_out(x)
        sparsity = torch.tanh(cfg.sparsity_c * dense * decoder_norms(clt)).sum((0, 2))  # [L]
        fired, l0 = (dense > 0).any(0), (dense > 0).sum((0, 2)) / len(x)
    mse = (recon - y).square().sum()
    preact = _preact(clt, x_enc, dead) if clt.cfg.activation == "jumprelu" and dead.any() else x.new_zeros(())
    total = (mse + (coef * sparsity).sum() + cfg.preact_coef * preact) / n_global
    n_enc = len(x_enc)
    parts = {"mse": mse.item() / len(x), "sparsity": sparsity.sum().item() / n_enc, "preact": preact.item() / n_enc}
    return StepLoss(total, parts, fired, l0, dead)


def _preact(clt: CrossLayerTranscoder, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """sum over tokens and the `dead` [L, F] features of relu(threshold - pre) on x [n, L, d], which
    raises pre, not lowers the threshold. The dead encoders are gathered once for all layers: a gather
    per layer wrote a zero gradient [L, F, d] per layer in the backward (~7% of a step at F 8,192)."""
    layer, feature = dead.nonzero(as_tuple=True)  # [n_dead], by layer
    W, b, threshold = clt.W_enc[layer, feature], clt.b_enc[layer, feature], clt.threshold.detach()[layer, feature]
    ends = torch.bincount(layer, minlength=clt.cfg.n_layers).cumsum(0).tolist()
    total = x.new_zeros(())
    for l, (a, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        pre = x[:, l] @ W[a:e].T + b[a:e]  # [n, n_dead in layer l]
        total = total + torch.relu(threshold[a:e] - pre).sum()
    return total


class Objective(torch.nn.Module):
    """`losses` as the forward of a module that holds the CLT, for DistributedDataParallel to wrap.
    DDP averages the ranks' gradients during the backward, so each rank normalises its loss by its
    own rows (the mean over ranks is then the single-process gradient)."""

    def __init__(self, clt: CrossLayerTranscoder, cfg: TrainConfig):
        super().__init__()
        self.clt, self.cfg = clt, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int, dead: torch.Tensor, coef: torch.Tensor) -> StepLoss:
        return losses(self.clt, x, y, step, self.cfg, dead, coef=coef)


def _reconstruction(clt: CrossLayerTranscoder, terms: list[LayerTerms], n: int) -> torch.Tensor:
    """The reconstruction [n, L, d] from every source layer's contribution (no b_dec, no skip)."""
    recon = terms[0].out.new_zeros(n, clt.cfg.n_layers, clt.cfg.d_model)
    for s, t in enumerate(terms):  # t.out [n, T, d]: layers s.. (cross-layer) or s alone
        recon[:, s : s + t.out.shape[1]] += t.out
    return recon


@torch.no_grad()
def fold_scales(clt: CrossLayerTranscoder, scales: Scales) -> CrossLayerTranscoder:
    """A copy of `clt` that takes raw activations and writes raw MLP outputs."""
    folded = CrossLayerTranscoder(clt.cfg).to(clt.W_enc.device, clt.W_enc.dtype)
    folded.load_state_dict(clt.state_dict())
    folded.W_enc.mul_(scales.inp[:, None, None])
    for s, w in enumerate(folded.W_dec):
        targets = [t for t in range(clt.cfg.n_layers) if s in clt.sources(t)]
        w.div_(scales.out[targets][None, :, None])
    folded.b_dec.div_(scales.out[:, None])
    if folded.W_skip is not None:
        folded.W_skip.mul_((scales.inp / scales.out)[:, None, None])
    return folded
