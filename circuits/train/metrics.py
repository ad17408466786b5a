"""How good a transcoder is on held-out text: its reconstructions, and the replacement model
(the transcoder spliced in place of every MLP) against the real model."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from circuits.attribution.splice import splice_hooks
from circuits.transcoders.clt import CrossLayerTranscoder


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
def replacement_metrics(
    model: HookedTransformer, clt: CrossLayerTranscoder, tokens: torch.Tensor, mask: torch.Tensor
) -> dict:
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
