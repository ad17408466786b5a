"""The cross-layer transcoder: sparse features that read the residual stream before each MLP
(`blocks.{l}.hook_resid_mid`) and write to the MLP outputs (`blocks.{l}.hook_mlp_out`) of that
layer and every later one.

Shapes: L layers, F features per layer, d = d_model.
    W_enc      [L, F, d]       encoder of source layer l
    b_enc      [L, F]
    threshold  [L, F]          JumpReLU threshold, fp32, stored directly
    W_dec[l]   [F, L - l, d]   slice k writes layer l + k ([F, 1, d] for a per-layer transcoder)
    b_dec      [L, d]          per target layer
    W_skip     [L, d, d]       optional linear skip path, y_l += x_l @ W_skip[l]

A per-layer transcoder is `cross_layer=False`; a skip transcoder adds `skip=True`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    n_features: int
    cross_layer: bool = True
    """False: a per-layer transcoder, each source writes only its own layer."""
    skip: bool = False
    """Add a learned linear skip path from each layer's input to its output."""
    activation: str = "jumprelu"
    """jumprelu | relu | topk"""
    topk: int = 16
    """Features kept per layer and token with activation = topk."""
    bandwidth: float = 0.05
    """Width of the straight-through window for the JumpReLU threshold gradient, in
    pre-activation units (inputs normalised to E||x|| = sqrt(d) during training)."""
    input_hook: str = "hook_resid_mid"
    output_hook: str = "hook_mlp_out"
    model_name: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_targets(self, source_layer: int) -> int:
        return self.n_layers - source_layer if self.cross_layer else 1


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """acts = pre * (pre > threshold); the threshold gets a straight-through gradient
    through a rectangle kernel of width `bandwidth` (Rajamanoharan et al., 2024)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad_out * (pre > threshold)
        grad_threshold = -(threshold / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad_out
        grad_threshold = grad_threshold.reshape(-1, *threshold.shape).sum(0)
        return grad_pre, grad_threshold, None


class SparseDecode(torch.autograd.Function):
    """out [n, K] = A @ W for a sparse A given by (values, token_idx, feature_idx); the backward
    touches only the decoder rows of active features."""

    @staticmethod
    def forward(ctx, values, token_idx, feature_idx, W, n_tokens: int):
        ctx.save_for_backward(values, token_idx, feature_idx, W)
        ctx.n_tokens = n_tokens
        A = torch.sparse_coo_tensor(
            torch.stack([token_idx, feature_idx]), values, (n_tokens, W.shape[0]), check_invariants=False
        )
        return torch.sparse.mm(A, W)

    @staticmethod
    def backward(ctx, grad_out):
        values, token_idx, feature_idx, W = ctx.saved_tensors
        grad_values = (grad_out[token_idx] * W[feature_idx]).sum(-1)
        At = torch.sparse_coo_tensor(
            torch.stack([feature_idx, token_idx]), values, (W.shape[0], ctx.n_tokens), check_invariants=False
        )
        return grad_values, None, None, torch.sparse.mm(At, grad_out), None


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, d))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.threshold = nn.Parameter(torch.zeros(L, F, dtype=torch.float32))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, cfg.n_targets(l), d)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        L, F, d = self.cfg.n_layers, self.cfg.n_features, self.cfg.d_model
        with torch.no_grad():
            self.W_enc.uniform_(-(F**-0.5), F**-0.5)
            for w in self.W_dec:
                w.uniform_(-((L * d) ** -0.5), (L * d) ** -0.5)

    # ---- encoder ---------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., L, d] (each layer's resid_mid) -> pre-activations [..., L, F]."""
        return torch.einsum("...ld,lfd->...lf", x, self.W_enc) + self.b_enc

    def activation(self, pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Pre-activations [..., L, F] (or [..., F] of one `layer`) -> activations, same shape."""
        kind = self.cfg.activation
        if kind == "jumprelu":
            threshold = self.threshold if layer is None else self.threshold[layer]
            return JumpReLU.apply(pre, threshold, self.cfg.bandwidth)
        if kind == "relu":
            return torch.relu(pre)
        if kind == "topk":
            values, indices = pre.topk(self.cfg.topk, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        raise ValueError(f"unknown activation {kind!r}: use jumprelu, relu or topk")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., L, d] -> feature activations [..., L, F]."""
        return self.activation(self.pre_activations(x))

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's resid_mid x [..., d] -> its feature activations [..., F]."""
        return self.activation(x @ self.W_enc[layer].T + self.b_enc[layer], layer)

    # ---- decoder ---------------------------------------------------------------------------

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """Decoder rows of source layer `source` writing to layer `target`: [F, d]."""
        k = target - source if self.cfg.cross_layer else 0
        if not 0 <= k < self.W_dec[source].shape[1] or (not self.cfg.cross_layer and source != target):
            raise ValueError(f"source layer {source} does not write to layer {target}")
        return self.W_dec[source][:, k]

    def sources(self, target: int) -> range:
        """Source layers that write to `target`."""
        return range(target + 1) if self.cfg.cross_layer else range(target, target + 1)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Dense reference decoder: acts [..., L, F] -> reconstruction [..., L, d] (b_dec included,
        skip path excluded)."""
        outs = []
        for t in range(self.cfg.n_layers):
            out = self.b_dec[t].expand(*acts.shape[:-2], -1)
            for s in self.sources(t):
                out = out + acts[..., s, :] @ self.decoder(s, t)
            outs.append(out)
        return torch.stack(outs, dim=-2)

    def decode_sparse(self, acts: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Same as `decode` for acts [n, L, F], touching only the features in `support` [n, L, F]
        (bool: every active feature, plus those whose gradient is needed, see `support`)."""
        n, L, d = acts.shape[0], self.cfg.n_layers, self.cfg.d_model
        outs = [self.b_dec[t].expand(n, d) for t in range(L)]
        for s in range(L):
            token_idx, feature_idx = support[:, s].nonzero(as_tuple=True)
            W = self.W_dec[s]  # [F, T, d]
            out = SparseDecode.apply(acts[token_idx, s, feature_idx], token_idx, feature_idx, W.flatten(1), n)
            out = out.view(n, W.shape[1], d)
            for k in range(W.shape[1]):
                t = s + k if self.cfg.cross_layer else s
                outs[t] = outs[t] + out[:, k]
        return torch.stack(outs, dim=-2)

    def skip_out(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path's contribution [..., L, d] (zeros without one)."""
        if self.W_skip is None:
            return torch.zeros_like(x)
        return torch.einsum("...ld,lde->...le", x, self.W_skip)

    def support(self, pre: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Features whose decoder rows a sparse pass must touch [..., L, F]: the active ones and,
        for JumpReLU, those inside the threshold's straight-through window (their activation is
        zero but the threshold gradient reads the gradient at them)."""
        if self.cfg.activation == "jumprelu":
            return pre > self.threshold - self.cfg.bandwidth / 2
        return acts != 0

    def forward(self, x: torch.Tensor, sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., L, d] -> (reconstruction of every layer's mlp_out [..., L, d], acts [..., L, F]).
        `sparse` (x of shape [n, L, d]) decodes only the supported features: same values and gradients."""
        pre = self.pre_activations(x)
        acts = self.activation(pre)
        recon = self.decode_sparse(acts, self.support(pre, acts)) if sparse else self.decode(acts)
        return recon + self.skip_out(x), acts

    @torch.no_grad()
    def active_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse activations of x [pos, L, d]: (indices [n_active, 3] as (pos, layer, feature),
        values [n_active])."""
        acts = self.encode(x)
        indices = acts.nonzero()
        return indices, acts[tuple(indices.T)]
